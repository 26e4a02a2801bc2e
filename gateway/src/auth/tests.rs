//! Tests of federated authentication: every 401 reason code, all three algorithms, the
//! config and JWKS checks, and URL JWKS rotation against a local HTTP server.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::*;

const HOUR: Duration = Duration::from_secs(3600);

/// Keys generated once per test binary: DE (EdDSA), FR (ES256), IT (RS256), and NL
/// (EdDSA), whose key plays the "other state" or the "rotated" key.
struct Fixture {
    dir: PathBuf,
    de: StateKeys,
    fr: StateKeys,
    it: StateKeys,
    nl: StateKeys,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = temp_dir("fixture");
        let gen_keys = |cc: &str, alg| {
            let state: Country = cc.parse().unwrap();
            generate_state_keys(&dir, &state, alg, &default_issuer(&state), DEFAULT_AUDIENCE)
                .unwrap()
        };
        Fixture {
            de: gen_keys("DE", SigningAlg::EdDsa),
            fr: gen_keys("FR", SigningAlg::Es256),
            it: gen_keys("IT", SigningAlg::Rs256),
            nl: gen_keys("NL", SigningAlg::EdDsa),
            dir,
        }
    })
}

fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sov-auth-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The authenticator of DE, FR, IT (NL is not configured).
fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let f = fixture();
        Authenticator::new(vec![
            f.de.issuer_config(&f.dir),
            f.fr.issuer_config(&f.dir),
            f.it.issuer_config(&f.dir),
        ])
        .unwrap()
    })
}

fn three() -> [&'static StateKeys; 3] {
    let f = fixture();
    [&f.de, &f.fr, &f.it]
}

fn claims_for(keys: &StateKeys) -> MintClaims {
    MintClaims {
        state: keys.state().to_string(),
        ministry: "finance".into(),
        clearance: Classification::Internal,
        classification: None,
        roles: vec![],
        subject: Some("alice".into()),
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn auth_with(auth: &Authenticator, token: &str) -> Result<Caller, AuthError> {
    auth.authenticate(Some(&bearer(token)))
        .await
        .map(|c| (*c).clone())
}

async fn reason_of(token: &str) -> &'static str {
    match auth_with(authenticator(), token).await {
        Ok(caller) => panic!("expected a rejection, got {caller:?}"),
        Err(e) => {
            assert!(!e.message.contains(token), "message leaks the token");
            e.reason
        }
    }
}

/// A valid token's claims, edited by `edit`, signed by `keys`.
fn edited(keys: &StateKeys, edit: impl FnOnce(&mut Value)) -> String {
    let mut claims = keys.claims_json(&claims_for(keys), HOUR);
    edit(&mut claims);
    keys.mint_raw(keys.header(), &claims).unwrap()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

#[tokio::test]
async fn valid_token_for_each_algorithm() {
    for keys in three() {
        let mut claims = claims_for(keys);
        claims.clearance = Classification::Restricted;
        claims.classification = Some(Classification::Internal);
        claims.roles = vec!["auditor".into(), "ops".into()];
        let token = keys.mint(&claims, HOUR).unwrap();
        let caller = auth_with(authenticator(), &token)
            .await
            .unwrap_or_else(|e| panic!("{}: {} {}", keys.alg(), e.reason, e));
        assert_eq!(&caller.state, keys.state());
        assert_eq!(caller.ministry, "finance");
        assert_eq!(caller.clearance, Classification::Restricted);
        assert_eq!(caller.default_classification, Classification::Internal);
        assert_eq!(caller.roles, vec!["auditor", "ops"]);
        assert!(caller.has_role("auditor"));
        assert_eq!(caller.subject.as_deref(), Some("alice"));
        assert!(caller.token_id.is_some());
    }
    // Defaults: no classification claim -> public; lower-case scheme accepted.
    let f = fixture();
    let mut claims = claims_for(&f.de);
    claims.subject = None;
    let token = f.de.mint(&claims, HOUR).unwrap();
    let caller = authenticator()
        .authenticate(Some(&format!("bearer  {token} ")))
        .await
        .unwrap();
    assert_eq!(caller.default_classification, Classification::Public);
    assert_eq!(caller.subject, None);
    assert!(caller.roles.is_empty());
}

#[tokio::test]
async fn missing_and_malformed_tokens() {
    let auth = authenticator();
    for header in [
        None,
        Some(""),
        Some("   "),
        Some("Bearer"),
        Some("Bearer   "),
    ] {
        let e = auth.authenticate(header).await.unwrap_err();
        assert_eq!(e.reason, reason::MISSING_TOKEN, "{header:?}");
        assert_eq!(e.http_status(), 401);
    }
    let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
    for header in [
        "Basic dXNlcjpwYXNz",
        "Bearer abc",
        "Bearer a.b",
        "Bearer a.b.c.d",
        "Bearer !!!.e30.sig",
        "Bearer e30.!!!.sig",
        "Bearer bm90IGpzb24.e30.sig", // header "not json"
        "Bearer W10.e30.sig",         // header `[]`
        "Bearer e30.e30.sig",         // header without alg
        long.as_str(),
    ] {
        let e = auth.authenticate(Some(header)).await.unwrap_err();
        assert_eq!(e.reason, reason::MALFORMED_TOKEN, "{header}");
    }
    // A valid header and claims but a signature that is not base64url.
    let f = fixture();
    let token = f.de.mint(&claims_for(&f.de), HOUR).unwrap();
    let (head, _) = token.rsplit_once('.').unwrap();
    assert_eq!(
        reason_of(&format!("{head}.%%%")).await,
        reason::MALFORMED_TOKEN
    );
}

#[tokio::test]
async fn alg_none_and_hmac_are_unsupported() {
    let f = fixture();
    for keys in three() {
        let claims = keys.claims_json(&claims_for(keys), HOUR);
        for alg in [
            "none", "None", "NONE", "HS256", "HS384", "HS512", "PS256", "RS384", "ES384", "",
        ] {
            let header = json!({"alg": alg, "typ": "JWT", "kid": keys.kid()});
            for sig in ["", "c2ln"] {
                let token = forge_token(&header, &claims, sig);
                assert_eq!(
                    reason_of(&token).await,
                    reason::UNSUPPORTED_ALGORITHM,
                    "{alg}"
                );
            }
        }
        // A real HS256 token whose secret is the state's public JWKS (key confusion).
        let jwks = std::fs::read(f.dir.join(format!(
            "{}.jwks.json",
            keys.state().as_str().to_ascii_lowercase()
        )))
        .unwrap();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(keys.kid().to_string());
        let token =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&jwks)).unwrap();
        assert_eq!(reason_of(&token).await, reason::UNSUPPORTED_ALGORITHM);
    }
}

#[tokio::test]
async fn algorithm_not_allowed_for_the_issuer_or_the_key() {
    let f = fixture();
    // FR's key signs an ES256 token that claims DE's issuer; DE allows EdDSA only.
    let mut claims = f.de.claims_json(&claims_for(&f.de), HOUR);
    claims["iss"] = json!(f.de.issuer());
    let token = f.fr.mint_raw(f.fr.header(), &claims).unwrap();
    assert_eq!(reason_of(&token).await, reason::UNSUPPORTED_ALGORITHM);

    // An issuer that allows all three: an EdDSA token naming that issuer's ES256 key.
    let mut config = f.fr.issuer_config(&f.dir);
    config.algorithms = ALLOWED_ALGORITHMS.iter().map(|a| a.to_string()).collect();
    let auth = Authenticator::new(vec![config]).unwrap();
    let mut header = f.de.header();
    header.kid = Some(f.fr.kid().to_string());
    let token =
        f.de.mint_raw(header, &f.fr.claims_json(&claims_for(&f.fr), HOUR))
            .unwrap();
    let e = auth_with(&auth, &token).await.unwrap_err();
    assert_eq!(e.reason, reason::UNSUPPORTED_ALGORITHM);
}

#[tokio::test]
async fn unknown_issuer_and_unknown_key_id() {
    let f = fixture();
    for keys in three() {
        let token = edited(keys, |c| c["iss"] = json!("https://idp.evil.example"));
        assert_eq!(reason_of(&token).await, reason::UNKNOWN_ISSUER);
        let token = edited(keys, |c| c["iss"] = json!(["a", "b"]));
        assert_eq!(reason_of(&token).await, reason::INVALID_CLAIM);

        let mut header = keys.header();
        header.kid = Some("no-such-kid".into());
        let token = keys
            .mint_raw(header, &keys.claims_json(&claims_for(keys), HOUR))
            .unwrap();
        assert_eq!(reason_of(&token).await, reason::UNKNOWN_KEY_ID);

        // No kid at all: the issuer's only key of that algorithm is used.
        let mut header = keys.header();
        header.kid = None;
        let token = keys
            .mint_raw(header, &keys.claims_json(&claims_for(keys), HOUR))
            .unwrap();
        auth_with(authenticator(), &token).await.unwrap();
    }
    // NL is not a configured state.
    let token = f.nl.mint(&claims_for(&f.nl), HOUR).unwrap();
    assert_eq!(reason_of(&token).await, reason::UNKNOWN_ISSUER);
}

#[tokio::test]
async fn bad_signatures() {
    let f = fixture();
    for keys in three() {
        let token = keys.mint(&claims_for(keys), HOUR).unwrap();
        let (head, sig) = token.rsplit_once('.').unwrap();
        let (header, _) = head.split_once('.').unwrap();

        // Claims changed after signing.
        let mut claims = keys.claims_json(&claims_for(keys), HOUR);
        claims["clearance"] = json!("restricted");
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        assert_eq!(
            reason_of(&format!("{header}.{payload}.{sig}")).await,
            reason::BAD_SIGNATURE,
            "{}",
            keys.alg()
        );
        // Signature truncated, emptied, or one bit flipped.
        let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        let n = raw.len();
        raw[n / 2] ^= 1;
        for bad in [
            URL_SAFE_NO_PAD.encode(&raw),
            URL_SAFE_NO_PAD.encode(&raw[..n / 2]),
            String::new(),
        ] {
            assert_eq!(
                reason_of(&format!("{head}.{bad}")).await,
                reason::BAD_SIGNATURE
            );
        }
    }
    // Another key of the same algorithm, presenting DE's kid and claims.
    let mut header = f.nl.header();
    header.kid = Some(f.de.kid().to_string());
    let token =
        f.nl.mint_raw(header, &f.de.claims_json(&claims_for(&f.de), HOUR))
            .unwrap();
    assert_eq!(reason_of(&token).await, reason::BAD_SIGNATURE);
}

#[tokio::test]
async fn time_checks() {
    for keys in three() {
        let t = now();
        let expired = edited(keys, |c| {
            c["iat"] = json!(t - 7200);
            c["nbf"] = json!(t - 7200);
            c["exp"] = json!(t - 120);
        });
        assert_eq!(
            reason_of(&expired).await,
            reason::TOKEN_EXPIRED,
            "{}",
            keys.alg()
        );
        let early = edited(keys, |c| c["nbf"] = json!(t + 600));
        assert_eq!(reason_of(&early).await, reason::TOKEN_NOT_YET_VALID);
        let no_exp = edited(keys, |c| {
            c.as_object_mut().unwrap().remove("exp");
        });
        assert_eq!(reason_of(&no_exp).await, reason::MISSING_CLAIM);
        let text_exp = edited(keys, |c| c["exp"] = json!("tomorrow"));
        assert_eq!(reason_of(&text_exp).await, reason::INVALID_CLAIM);
        // Within the clock leeway both ways.
        let skewed = edited(keys, |c| {
            c["exp"] = json!(t - 10);
            c["nbf"] = json!(t + 10);
        });
        auth_with(authenticator(), &skewed).await.unwrap();
    }
}

#[tokio::test]
async fn audience_checks() {
    for keys in three() {
        let other = edited(keys, |c| c["aud"] = json!("another-service"));
        assert_eq!(
            reason_of(&other).await,
            reason::WRONG_AUDIENCE,
            "{}",
            keys.alg()
        );
        let others = edited(keys, |c| c["aud"] = json!(["a", "b"]));
        assert_eq!(reason_of(&others).await, reason::WRONG_AUDIENCE);
        let none = edited(keys, |c| {
            c.as_object_mut().unwrap().remove("aud");
        });
        assert_eq!(reason_of(&none).await, reason::MISSING_CLAIM);
        let listed = edited(keys, |c| c["aud"] = json!(["x", DEFAULT_AUDIENCE]));
        auth_with(authenticator(), &listed).await.unwrap();
    }
}

#[tokio::test]
async fn required_and_invalid_claims() {
    let f = fixture();
    for name in ["state", "ministry", "clearance", "iss"] {
        let token = edited(&f.fr, |c| {
            c.as_object_mut().unwrap().remove(name);
        });
        assert_eq!(reason_of(&token).await, reason::MISSING_CLAIM, "{name}");
        let token = edited(&f.fr, |c| c[name] = Value::Null);
        assert_eq!(
            reason_of(&token).await,
            reason::MISSING_CLAIM,
            "{name} null"
        );
    }
    let cases: Vec<(&str, Value)> = vec![
        ("state", json!("France")),
        ("state", json!(33)),
        ("ministry", json!("")),
        ("ministry", json!("finance ministry")),
        ("ministry", json!(["finance"])),
        ("clearance", json!("secret")),
        ("clearance", json!(2)),
        ("classification", json!("restricted")), // above clearance `internal`
        ("classification", json!("top")),
        ("roles", json!("auditor")),
        ("roles", json!([1, 2])),
        ("roles", json!(["a b"])),
        ("sub", json!(5)),
        ("jti", json!({"a": 1})),
    ];
    for (name, value) in cases {
        let token = edited(&f.fr, |c| c[name] = value.clone());
        assert_eq!(
            reason_of(&token).await,
            reason::INVALID_CLAIM,
            "{name} = {value}"
        );
    }
}

#[tokio::test]
async fn state_a_signing_for_state_b() {
    let f = fixture();
    // DE's IdP signs a token claiming FR.
    let token = edited(&f.de, |c| c["state"] = json!("FR"));
    let e = auth_with(authenticator(), &token).await.unwrap_err();
    assert_eq!(e.reason, reason::STATE_MISMATCH);
    assert!(e.message.contains("DE") && e.message.contains("FR"), "{e}");
    // Lower-case state of the right country is fine.
    let token = edited(&f.de, |c| c["state"] = json!("de"));
    auth_with(authenticator(), &token).await.unwrap();

    // FR's key signs a token that claims to come from IT's IdP (with FR's kid): the key
    // is not in IT's JWKS; IT allows RS256 only, so the ES256 header is refused first.
    let token =
        f.fr.mint_raw(f.fr.header(), &f.it.claims_json(&claims_for(&f.it), HOUR))
            .unwrap();
    assert_eq!(reason_of(&token).await, reason::UNSUPPORTED_ALGORITHM);
    // Same with a state whose IdP allows the algorithm: NL's EdDSA key, DE's issuer.
    let token =
        f.nl.mint_raw(f.nl.header(), &f.de.claims_json(&claims_for(&f.de), HOUR))
            .unwrap();
    assert_eq!(reason_of(&token).await, reason::UNKNOWN_KEY_ID);
}

#[test]
fn classification_for_never_exceeds_clearance() {
    let caller = Caller {
        state: "DE".parse().unwrap(),
        ministry: "bmf".into(),
        clearance: Classification::Internal,
        default_classification: Classification::Public,
        roles: vec![],
        subject: None,
        token_id: None,
        audit_hmac: Default::default(),
    };
    assert_eq!(caller.classification_for(None), Ok(Classification::Public));
    assert_eq!(
        caller.classification_for(Some(Classification::Internal)),
        Ok(Classification::Internal)
    );
    let e = caller
        .classification_for(Some(Classification::Restricted))
        .unwrap_err();
    assert_eq!(e.reason, reason::CLASSIFICATION_ABOVE_CLEARANCE);
    assert_eq!(e.http_status(), 403);
}

fn base_config(jwks_file: &Path) -> IssuerConfig {
    IssuerConfig {
        state: "DE".parse().unwrap(),
        issuer: "https://idp.de.example.eu".into(),
        audience: DEFAULT_AUDIENCE.into(),
        jwks_file: Some(jwks_file.to_path_buf()),
        jwks_url: None,
        jwks_ca_file: None,
        refresh_secs: DEFAULT_REFRESH_SECS,
        algorithms: vec!["EdDSA".into()],
    }
}

fn config_error(config: IssuerConfig) -> String {
    Authenticator::new(vec![config]).unwrap_err().to_string()
}

#[test]
fn config_rejects_other_algorithms_and_bad_settings() {
    let f = fixture();
    let jwks = f.dir.join("de.jwks.json");
    for alg in ["HS256", "none", "RS384", "PS256", "eddsa"] {
        let mut c = base_config(&jwks);
        c.algorithms = vec!["EdDSA".into(), alg.into()];
        let msg = config_error(c);
        assert!(msg.contains(alg) && msg.contains("DE"), "{msg}");
    }
    let mut c = base_config(&jwks);
    c.algorithms.clear();
    assert!(config_error(c).contains("algorithms"));
    let mut c = base_config(&jwks);
    c.jwks_file = None;
    assert!(config_error(c).contains("jwks_file"));
    let mut c = base_config(&jwks);
    c.jwks_url = Some("https://idp.de.example.eu/jwks".into());
    Authenticator::new(vec![c]).expect("https JWKS URLs are accepted");
    let mut c = base_config(&jwks);
    c.jwks_url = Some("ftp://x/jwks".into());
    assert!(config_error(c).contains("https://"));
    let mut c = base_config(&jwks);
    c.audience = " ".into();
    assert!(config_error(c).contains("audience"));
    let twice = Authenticator::new(vec![base_config(&jwks), base_config(&jwks)]).unwrap_err();
    assert!(twice.to_string().contains("twice"), "{twice}");

    // TOML as embedded in the gateway config: defaults and unknown fields.
    #[derive(serde::Deserialize)]
    struct Top {
        member_state: Vec<IssuerConfig>,
    }
    let top: Top = toml::from_str(
        "[[member_state]]\nstate = \"de\"\nissuer = \"https://i\"\naudience = \"a\"\njwks_file = \"x.json\"\n",
    )
    .unwrap();
    let c = &top.member_state[0];
    assert_eq!(c.state.as_str(), "DE");
    assert_eq!(c.refresh_secs, 300);
    assert_eq!(c.algorithms, vec!["RS256", "ES256", "EdDSA"]);
    let bad = toml::from_str::<Top>(
        "[[member_state]]\nstate = \"DE\"\nissuer = \"i\"\naudience = \"a\"\njwks_file = \"x\"\njwks = \"y\"\n",
    );
    assert!(bad.is_err());
}

#[test]
fn jwks_file_errors_name_the_file() {
    let dir = temp_dir("jwks");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cases = [
        (dir.join("absent.json"), "cannot read"),
        (write("text.json", "hello"), "not valid JSON"),
        (write("nokeys.json", "{\"kids\": []}"), "no `keys` array"),
        (write("empty.json", "{\"keys\": []}"), "empty"),
        (
            write(
                "hmac.json",
                r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h","alg":"HS256"}]}"#,
            ),
            "no usable",
        ),
        (
            write(
                "badx.json",
                r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"!!","kid":"e"}]}"#,
            ),
            "no usable",
        ),
    ];
    for (path, want) in cases {
        let e = Authenticator::new(vec![base_config(&path)]).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, AuthConfigError::JwksFile { .. }), "{msg}");
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(want),
            "{msg}"
        );
    }
    // Encryption keys are skipped, signature keys kept.
    let f = fixture();
    let de: Value =
        serde_json::from_slice(&std::fs::read(f.dir.join("de.jwks.json")).unwrap()).unwrap();
    let mut enc = de["keys"][0].clone();
    enc["use"] = json!("enc");
    enc["kid"] = json!("enc-key");
    let mixed = json!({"keys": [enc, de["keys"][0].clone()]});
    let path = write("mixed.json", &mixed.to_string());
    Authenticator::new(vec![base_config(&path)]).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn keys_round_trip_through_the_directory() {
    let f = fixture();
    let loaded = load_state_keys(&f.dir, f.it.state()).unwrap();
    assert_eq!(loaded.info(), f.it.info());
    let token = loaded.mint(&claims_for(&loaded), HOUR).unwrap();
    auth_with(authenticator(), &token).await.unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(f.dir.join("it.key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let missing = load_state_keys(&f.dir, &"SE".parse().unwrap()).unwrap_err();
    assert!(
        format!("{missing:#}").contains("se.idp.json"),
        "{missing:#}"
    );
    let no_dir = load_state_keys(&f.dir.join("nope"), &"SE".parse().unwrap()).unwrap_err();
    assert!(format!("{no_dir:#}").contains("does not exist"));
    // The JWKS carries kid, alg and use.
    let jwks: Value =
        serde_json::from_slice(&std::fs::read(f.dir.join("fr.jwks.json")).unwrap()).unwrap();
    assert_eq!(jwks["keys"][0]["kid"], json!(f.fr.kid()));
    assert_eq!(jwks["keys"][0]["alg"], json!("ES256"));
    assert_eq!(jwks["keys"][0]["use"], json!("sig"));
    assert!(
        jwks["keys"][0].get("d").is_none(),
        "private part in the JWKS"
    );
}

/// A one-thread HTTP server answering every request with the current status and body.
struct JwksServer {
    url: String,
    reply: Arc<Mutex<(u16, Vec<u8>)>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    fn start(body: Vec<u8>) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let reply = Arc::new(Mutex::new((200u16, body)));
        let hits = Arc::new(AtomicUsize::new(0));
        let (r, h) = (reply.clone(), hits.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let (status, body) = r.lock().unwrap().clone();
                h.fetch_add(1, Ordering::SeqCst);
                let head = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        JwksServer { url, reply, hits }
    }

    fn serve(&self, status: u16, body: Vec<u8>) {
        *self.reply.lock().unwrap() = (status, body);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn jwks_of(keys: &StateKeys) -> Vec<u8> {
    let f = fixture();
    std::fs::read(f.dir.join(format!(
        "{}.jwks.json",
        keys.state().as_str().to_ascii_lowercase()
    )))
    .unwrap()
}

fn url_config(url: &str, refresh_secs: u64) -> IssuerConfig {
    let f = fixture();
    let mut config = f.de.issuer_config(&f.dir);
    config.jwks_file = None;
    config.jwks_url = Some(url.to_string());
    config.refresh_secs = refresh_secs;
    config
}

/// A token for DE's issuer signed with NL's key under NL's kid: the "rotated" key.
fn rotated_token() -> String {
    let f = fixture();
    f.nl.mint_raw(f.nl.header(), &f.de.claims_json(&claims_for(&f.de), HOUR))
        .unwrap()
}

#[tokio::test]
async fn url_jwks_unknown_kid_refresh_is_rate_limited() {
    let f = fixture();
    let server = JwksServer::start(jwks_of(&f.de));
    let auth = Authenticator::new(vec![url_config(&server.url, 3600)])
        .unwrap()
        .with_refresh_cooldown(Duration::from_millis(500));
    let old = f.de.mint(&claims_for(&f.de), HOUR).unwrap();
    // Nothing fetched yet: the unknown kid triggers the first fetch.
    auth_with(&auth, &old).await.unwrap();
    assert_eq!(server.hits(), 1);
    auth_with(&auth, &old).await.unwrap();
    assert_eq!(server.hits(), 1, "known kid must not fetch");

    // The IdP rotates to a new key; within the cooldown no second fetch happens.
    server.serve(200, jwks_of(&f.nl));
    let new = rotated_token();
    assert_eq!(
        auth_with(&auth, &new).await.unwrap_err().reason,
        reason::UNKNOWN_KEY_ID
    );
    assert_eq!(server.hits(), 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let caller = auth_with(&auth, &new).await.unwrap();
    assert_eq!(caller.state.as_str(), "DE");
    assert_eq!(server.hits(), 2);
    // The old key is gone from the new JWKS.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        auth_with(&auth, &old).await.unwrap_err().reason,
        reason::UNKNOWN_KEY_ID
    );
    assert_eq!(server.hits(), 3);
    // Many unknown kids in a row cause no more fetches within the cooldown.
    for _ in 0..20 {
        assert_eq!(
            auth_with(&auth, &old).await.unwrap_err().reason,
            reason::UNKNOWN_KEY_ID
        );
    }
    assert_eq!(server.hits(), 3);
}

#[tokio::test]
async fn url_jwks_periodic_refresh_keeps_keys_on_failure() {
    let f = fixture();
    let server = JwksServer::start(jwks_of(&f.de));
    let auth = Arc::new(
        Authenticator::new(vec![url_config(&server.url, 1)])
            .unwrap()
            .with_refresh_cooldown(HOUR),
    );
    let handle = auth.spawn_refresh().expect("a refresh task");
    wait_for_hits(&server, 1).await;
    let old = f.de.mint(&claims_for(&f.de), HOUR).unwrap();
    auth_with(&auth, &old).await.unwrap();

    server.serve(200, jwks_of(&f.nl));
    let seen = server.hits();
    wait_for_hits(&server, seen + 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    auth_with(&auth, &rotated_token()).await.unwrap();

    // The IdP fails: the cached keys stay.
    server.serve(500, b"oops".to_vec());
    let seen = server.hits();
    wait_for_hits(&server, seen + 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    auth_with(&auth, &rotated_token()).await.unwrap();
    server.serve(200, b"not json".to_vec());
    let seen = server.hits();
    wait_for_hits(&server, seen + 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    auth_with(&auth, &rotated_token()).await.unwrap();
    handle.abort();

    // No URL, no task.
    assert!(
        Arc::new(Authenticator::new(vec![f.de.issuer_config(&f.dir)]).unwrap())
            .spawn_refresh()
            .is_none()
    );
}

async fn wait_for_hits(server: &JwksServer, n: usize) {
    for _ in 0..100 {
        if server.hits() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the JWKS server saw {} requests, expected {n}",
        server.hits()
    );
}

#[test]
fn authenticator_is_shareable_and_its_future_is_send() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: T) {}
    let auth = authenticator();
    send_sync(auth);
    send(auth.authenticate(None));
}

/// A one-shot HTTPS JWKS server on 127.0.0.1 with a certificate from a fresh CA;
/// returns (url, CA PEM path).
fn https_jwks_server(body: Vec<u8>, connections: usize) -> (String, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let f = fixture();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let ca_path = f.dir.join(format!(
        "jwks-ca-{}.pem",
        N_CA.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/jwks.json", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(connections) {
            let Ok(tcp) = stream else { continue };
            let Ok(conn) = rustls::ServerConnection::new(cfg.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = tls.write_all(head.as_bytes());
            let _ = tls.write_all(&body);
            let _ = tls.flush();
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    (url, ca_path)
}

static N_CA: AtomicUsize = AtomicUsize::new(0);

#[tokio::test]
async fn https_jwks_url_is_verified_against_the_configured_ca() {
    let f = fixture();
    let token = f.de.mint(&claims_for(&f.de), HOUR).unwrap();
    // Trusted through jwks_ca_file: keys fetched over TLS, the token verifies.
    let (url, ca) = https_jwks_server(jwks_of(&f.de), 1);
    let mut config = url_config(&url, 3600);
    config.jwks_ca_file = Some(ca);
    let auth = Authenticator::new(vec![config]).unwrap();
    auth_with(&auth, &token).await.unwrap();
    // The same server without its CA: the certificate is refused, so no key is known.
    let (url, _) = https_jwks_server(jwks_of(&f.de), 1);
    let auth = Authenticator::new(vec![url_config(&url, 3600)]).unwrap();
    let err = auth_with(&auth, &token).await.unwrap_err();
    assert_eq!(err.reason, reason::UNKNOWN_KEY_ID, "{err:?}");
}
