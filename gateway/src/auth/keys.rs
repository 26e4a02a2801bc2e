//! Demo identity providers: one signing key per member state, kept in a keys directory,
//! and the minting of tokens with it. Used by the demo, the tests and `sovctl`; the
//! gateway itself only ever reads the public JWKS these functions write.
//!
//! Files per state (`cc` is the lower-case country code):
//! - `cc.key.pem`: the private key (PKCS#8, PKCS#1 for RSA), mode 0600;
//! - `cc.jwks.json`: the public JWKS (`kid`, `alg`, `use: sig`) the gateway loads;
//! - `cc.idp.json`: `{state, issuer, audience, alg, kid}`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
    EllipticCurveKeyType, Jwk, JwkSet, KeyAlgorithm, OctetKeyPairParameters, OctetKeyPairType,
    PublicKeyUse, RSAKeyParameters, RSAKeyType, ThumbprintHash,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::config::{DEFAULT_REFRESH_SECS, IssuerConfig};
use crate::domain::{Classification, Country};

/// The signature algorithms a demo IdP can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SigningAlg {
    #[serde(rename = "RS256")]
    Rs256,
    #[serde(rename = "ES256")]
    Es256,
    #[serde(rename = "EdDSA")]
    EdDsa,
}

impl SigningAlg {
    pub const ALL: [SigningAlg; 3] = [Self::Rs256, Self::Es256, Self::EdDsa];

    /// The JOSE name: `RS256`, `ES256`, `EdDSA`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
            Self::EdDsa => "EdDSA",
        }
    }

    pub fn algorithm(self) -> Algorithm {
        match self {
            Self::Rs256 => Algorithm::RS256,
            Self::Es256 => Algorithm::ES256,
            Self::EdDsa => Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for SigningAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SigningAlg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "RS256" => Ok(Self::Rs256),
            "ES256" => Ok(Self::Es256),
            "EDDSA" => Ok(Self::EdDsa),
            _ => Err(format!(
                "`{s}` is not a supported signing algorithm (EdDSA, ES256, RS256)"
            )),
        }
    }
}

/// The claims a demo IdP puts in a token (besides `iss`, `aud`, `iat`, `nbf`, `exp`,
/// `jti`, which minting adds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintClaims {
    pub state: String,
    pub ministry: String,
    pub clearance: Classification,
    pub classification: Option<Classification>,
    pub roles: Vec<String>,
    pub subject: Option<String>,
}

/// `cc.idp.json`: what the gateway (and `load_state_keys`) needs to know about a demo IdP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdpInfo {
    pub state: Country,
    pub issuer: String,
    pub audience: String,
    pub alg: SigningAlg,
    pub kid: String,
}

/// One member state's signing key. Can mint tokens; never prints its private key.
#[derive(Clone)]
pub struct StateKeys {
    info: IdpInfo,
    key: EncodingKey,
}

impl fmt::Debug for StateKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateKeys")
            .field("info", &self.info)
            .field("key", &"<private>")
            .finish()
    }
}

/// The default issuer of a demo IdP: `https://idp.<cc>.example.eu`.
pub fn default_issuer(state: &Country) -> String {
    format!(
        "https://idp.{}.example.eu",
        state.as_str().to_ascii_lowercase()
    )
}

/// The default audience of gateway tokens.
pub const DEFAULT_AUDIENCE: &str = "sovereign-gateway";

/// Paths of one state's files in a keys directory.
pub fn key_paths(dir: &Path, state: &Country) -> (PathBuf, PathBuf, PathBuf) {
    let cc = state.as_str().to_ascii_lowercase();
    (
        dir.join(format!("{cc}.key.pem")),
        dir.join(format!("{cc}.jwks.json")),
        dir.join(format!("{cc}.idp.json")),
    )
}

/// Generates a fresh key pair for `state` and writes `cc.key.pem` (0600), `cc.jwks.json`
/// and `cc.idp.json` into `dir` (created if missing), replacing any earlier files.
pub fn generate_state_keys(
    dir: &Path,
    state: &Country,
    alg: SigningAlg,
    issuer: &str,
    audience: &str,
) -> anyhow::Result<StateKeys> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create keys directory {}", dir.display()))?;
    let (pem, params) = generate_key_pair(alg)?;
    let key = encoding_key(alg, pem.as_bytes())?;
    let mut jwk = Jwk {
        common: CommonParameters {
            key_algorithm: Some(match alg {
                SigningAlg::Rs256 => KeyAlgorithm::RS256,
                SigningAlg::Es256 => KeyAlgorithm::ES256,
                SigningAlg::EdDsa => KeyAlgorithm::EdDSA,
            }),
            ..Default::default()
        },
        algorithm: params,
    };
    let thumb = jwk
        .thumbprint(ThumbprintHash::SHA256)
        .context("cannot compute the key thumbprint")?;
    let kid = format!(
        "{}-{}",
        state.as_str().to_ascii_lowercase(),
        thumb.get(..16).unwrap_or(&thumb)
    );
    jwk.common.key_id = Some(kid.clone());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    let jwks = JwkSet { keys: vec![jwk] };
    let info = IdpInfo {
        state: state.clone(),
        issuer: issuer.to_string(),
        audience: audience.to_string(),
        alg,
        kid,
    };

    let (key_path, jwks_path, idp_path) = key_paths(dir, state);
    write_private(&key_path, pem.as_bytes())?;
    write_file(&jwks_path, &serde_json::to_vec_pretty(&jwks)?)?;
    write_file(&idp_path, &serde_json::to_vec_pretty(&info)?)?;
    Ok(StateKeys { info, key })
}

/// Loads a state's signing key written by [`generate_state_keys`].
pub fn load_state_keys(dir: &Path, state: &Country) -> anyhow::Result<StateKeys> {
    if !dir.is_dir() {
        bail!(
            "keys directory {} does not exist (create it with `sovctl keys generate --dir {} \
             --state {state}`)",
            dir.display(),
            dir.display()
        );
    }
    let (key_path, _, idp_path) = key_paths(dir, state);
    let text = std::fs::read_to_string(&idp_path).map_err(|e| {
        anyhow::anyhow!(
            "no identity provider for {state} in {}: cannot read {}: {e} (create it with \
             `sovctl keys generate --dir {} --state {state}`)",
            dir.display(),
            idp_path.display(),
            dir.display()
        )
    })?;
    let info: IdpInfo = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid IdP description", idp_path.display()))?;
    if &info.state != state {
        bail!(
            "{} describes state {}, not {state}",
            idp_path.display(),
            info.state
        );
    }
    let pem = std::fs::read(&key_path)
        .with_context(|| format!("cannot read private key {}", key_path.display()))?;
    let key = encoding_key(info.alg, &pem).with_context(|| {
        format!(
            "{} is not a valid {} private key",
            key_path.display(),
            info.alg
        )
    })?;
    Ok(StateKeys { info, key })
}

impl StateKeys {
    pub fn info(&self) -> &IdpInfo {
        &self.info
    }
    pub fn state(&self) -> &Country {
        &self.info.state
    }
    pub fn issuer(&self) -> &str {
        &self.info.issuer
    }
    pub fn audience(&self) -> &str {
        &self.info.audience
    }
    pub fn alg(&self) -> SigningAlg {
        self.info.alg
    }
    pub fn kid(&self) -> &str {
        &self.info.kid
    }

    /// Mints a token valid from now for `ttl`.
    pub fn mint(&self, claims: &MintClaims, ttl: Duration) -> anyhow::Result<String> {
        self.mint_raw(self.header(), &self.claims_json(claims, ttl))
    }

    /// The JSON claims [`mint`](Self::mint) would sign: `iss`, `aud`, `iat`, `nbf`,
    /// `exp`, `jti` plus the given claims. Tests edit it and sign it with
    /// [`mint_raw`](Self::mint_raw).
    pub fn claims_json(&self, claims: &MintClaims, ttl: Duration) -> serde_json::Value {
        let now = jsonwebtoken::get_current_timestamp();
        let mut jti = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut jti);
        let mut v = serde_json::json!({
            "iss": self.info.issuer,
            "aud": self.info.audience,
            "iat": now,
            "nbf": now,
            "exp": now.saturating_add(ttl.as_secs()),
            "jti": URL_SAFE_NO_PAD.encode(jti),
            "state": claims.state,
            "ministry": claims.ministry,
            "clearance": claims.clearance.to_string(),
        });
        if let Some(c) = claims.classification {
            v["classification"] = serde_json::json!(c.to_string());
        }
        if !claims.roles.is_empty() {
            v["roles"] = serde_json::json!(claims.roles);
        }
        if let Some(sub) = &claims.subject {
            v["sub"] = serde_json::json!(sub);
        }
        v
    }

    /// The header [`mint`](Self::mint) uses: `alg` of this key, `typ: JWT`, `kid`.
    pub fn header(&self) -> Header {
        let mut h = Header::new(self.info.alg.algorithm());
        h.kid = Some(self.info.kid.clone());
        h
    }

    /// Signs arbitrary claims under an arbitrary header with this state's key (the
    /// header's `alg` must be this key's algorithm). For tests: wrong `aud`, `exp` in the
    /// past, another state's `kid`, and so on.
    pub fn mint_raw(&self, header: Header, claims: &serde_json::Value) -> anyhow::Result<String> {
        jsonwebtoken::encode(&header, claims, &self.key).context("cannot sign the token")
    }

    /// The gateway configuration for this IdP, pointing at `dir`'s JWKS file.
    pub fn issuer_config(&self, dir: &Path) -> IssuerConfig {
        let (_, jwks_path, _) = key_paths(dir, &self.info.state);
        IssuerConfig {
            state: self.info.state.clone(),
            issuer: self.info.issuer.clone(),
            audience: self.info.audience.clone(),
            jwks_file: Some(jwks_path),
            jwks_url: None,
            jwks_ca_file: None,
            refresh_secs: DEFAULT_REFRESH_SECS,
            algorithms: vec![self.info.alg.as_str().to_string()],
        }
    }
}

/// Builds a token from a JSON header and claims and a literal signature part, without
/// any signing. For tests that forge `alg: none` or malformed tokens.
pub fn forge_token(
    header: &serde_json::Value,
    claims: &serde_json::Value,
    signature: &str,
) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        signature
    )
}

/// A fresh private key in PEM form and its public JWK parameters.
fn generate_key_pair(alg: SigningAlg) -> anyhow::Result<(String, AlgorithmParameters)> {
    let mut rng = rand::rngs::OsRng;
    Ok(match alg {
        SigningAlg::Rs256 => {
            use rsa::pkcs1::{EncodeRsaPrivateKey, LineEnding};
            use rsa::traits::PublicKeyParts;
            let key =
                rsa::RsaPrivateKey::new(&mut rng, 2048).context("RSA key generation failed")?;
            let pem = key
                .to_pkcs1_pem(LineEnding::LF)
                .context("cannot encode the RSA key")?
                .to_string();
            let params = AlgorithmParameters::RSA(RSAKeyParameters {
                key_type: RSAKeyType::RSA,
                n: URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
                e: URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
            });
            (pem, params)
        }
        SigningAlg::Es256 => {
            use p256::elliptic_curve::sec1::{Coordinates, ToEncodedPoint};
            use p256::pkcs8::{EncodePrivateKey, LineEnding};
            let key = p256::SecretKey::random(&mut rng);
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .context("cannot encode the P-256 key")?
                .to_string();
            let point = key.public_key().to_encoded_point(false);
            let Coordinates::Uncompressed { x, y } = point.coordinates() else {
                bail!("P-256 public key is not an uncompressed point");
            };
            let params = AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                key_type: EllipticCurveKeyType::EC,
                curve: EllipticCurve::P256,
                x: URL_SAFE_NO_PAD.encode(x),
                y: URL_SAFE_NO_PAD.encode(y),
            });
            (pem, params)
        }
        SigningAlg::EdDsa => {
            use ed25519_dalek::pkcs8::{EncodePrivateKey, spki::der::pem::LineEnding};
            let key = ed25519_dalek::SigningKey::generate(&mut rng);
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .context("cannot encode the Ed25519 key")?
                .to_string();
            let params = AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                key_type: OctetKeyPairType::OctetKeyPair,
                curve: EllipticCurve::Ed25519,
                x: URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
            });
            (pem, params)
        }
    })
}

fn encoding_key(alg: SigningAlg, pem: &[u8]) -> anyhow::Result<EncodingKey> {
    let key = match alg {
        SigningAlg::Rs256 => EncodingKey::from_rsa_pem(pem),
        SigningAlg::Es256 => EncodingKey::from_ec_pem(pem),
        SigningAlg::EdDsa => EncodingKey::from_ed_pem(pem),
    };
    key.map_err(|e| anyhow::anyhow!("not a {alg} private key in PEM form: {e}"))
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes a private key readable by its owner only (a fresh file, so an older file's
/// permissions are not inherited).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot replace {}", path.display())),
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}
