//! Keys and signed notes: the Ed25519 key that signs checkpoints and receipts (Go
//! `sumdb/note` key formats via the `signed_note` crate), verifier keys, per-state HMAC
//! keys, and C2SP checkpoints (`<origin>\n<size>\n<base64 root>\n` + signature lines).

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use signed_note::{
    Note, Signer as _, StandardSigner, StandardVerifier, Verifier as _, VerifierList,
};

use super::AuditError;
use super::merkle::Hash;

/// Default key name in signature lines and verifier keys.
pub const DEFAULT_KEY_NAME: &str = "sovereign-gateway";

/// The gateway's checkpoint and receipt signing key (a Go `note` signer key file:
/// `PRIVATE+KEY+<name>+<hex id>+<base64(0x01 || seed)>`).
pub struct SigningKey {
    signer: StandardSigner,
    vkey: String,
    /// `<name>+<hex id>`, as receipts name their key.
    receipt_key_id: String,
}

impl SigningKey {
    pub fn from_skey(skey: &str) -> Result<Self, AuditError> {
        let skey = skey.trim();
        let signer =
            StandardSigner::new(skey).map_err(|e| AuditError::Key(format!("signing key: {e}")))?;
        let b64 = skey.splitn(5, '+').nth(4).unwrap_or_default();
        let raw = B64
            .decode(b64)
            .map_err(|_| AuditError::Key("signing key: bad base64".into()))?;
        let seed: [u8; 32] = raw
            .get(1..)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| AuditError::Key("signing key: not an Ed25519 key".into()))?;
        let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
        let vkey = signed_note::new_ed25519_verifier_key(signer.name(), &sk.verifying_key());
        let receipt_key_id = format!("{}+{:08x}", signer.name(), signer.key_id());
        Ok(Self {
            signer,
            vkey,
            receipt_key_id,
        })
    }

    pub fn load(path: &Path) -> Result<Self, AuditError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AuditError::Key(format!("{}: {e}", path.display())))?;
        Self::from_skey(&text).map_err(|e| match e {
            AuditError::Key(m) => AuditError::Key(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// The verifier key line `<name>+<hex id>+<base64(0x01 || pubkey)>`.
    pub fn vkey(&self) -> &str {
        &self.vkey
    }

    pub fn name(&self) -> &str {
        self.signer.name()
    }

    /// `<name>+<hex id>`: the `key` field of receipts.
    pub fn receipt_key_id(&self) -> &str {
        &self.receipt_key_id
    }

    pub fn key_id(&self) -> u32 {
        self.signer.key_id()
    }

    /// Raw Ed25519 signature over `msg`.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, AuditError> {
        self.signer
            .sign(msg)
            .map_err(|e| AuditError::Key(format!("signing failed: {e}")))
    }

    /// A signed C2SP checkpoint note for `origin` at `size` with `root`.
    pub fn sign_checkpoint(
        &self,
        origin: &str,
        size: u64,
        root: &Hash,
    ) -> Result<String, AuditError> {
        let text = checkpoint_text(origin, size, root);
        let mut note = Note::new(text.as_bytes(), &[])
            .map_err(|e| AuditError::Key(format!("checkpoint note: {e}")))?;
        note.add_sigs(&[&self.signer])
            .map_err(|e| AuditError::Key(format!("checkpoint note: {e}")))?;
        String::from_utf8(note.to_bytes()).map_err(|e| AuditError::Key(e.to_string()))
    }
}

/// Generate a signing key: `(signer key file text, verifier key line)`.
pub fn generate_signing_key(name: &str) -> Result<(String, String), AuditError> {
    if !signed_note::is_key_name_valid(name) {
        return Err(AuditError::Key(format!(
            "key name `{name}` must be non-empty, without spaces or '+'"
        )));
    }
    Ok(signed_note::generate_key(&mut rand::rngs::OsRng, name))
}

/// A public verifier key (`<name>+<hex id>+<base64(0x01 || pubkey)>`).
#[derive(Clone)]
pub struct VerifierKey {
    line: String,
    verifier: StandardVerifier,
}

impl std::fmt::Debug for VerifierKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.line)
    }
}

impl VerifierKey {
    pub fn parse(vkey: &str) -> Result<Self, AuditError> {
        let line = vkey.trim().to_string();
        let verifier = StandardVerifier::new(&line)
            .map_err(|e| AuditError::Key(format!("verifier key `{line}`: {e}")))?;
        Ok(Self { line, verifier })
    }

    /// A key file holding the line, or the line itself.
    pub fn load(arg: &str) -> Result<Self, AuditError> {
        let p = Path::new(arg);
        if p.is_file() {
            let text = std::fs::read_to_string(p)
                .map_err(|e| AuditError::Key(format!("{}: {e}", p.display())))?;
            Self::parse(&text)
        } else {
            Self::parse(arg)
        }
    }

    pub fn line(&self) -> &str {
        &self.line
    }

    pub fn name(&self) -> &str {
        self.verifier.name()
    }

    pub fn key_id(&self) -> u32 {
        self.verifier.key_id()
    }

    /// Raw Ed25519 signature check.
    pub fn verify_raw(&self, msg: &[u8], sig: &[u8]) -> bool {
        self.verifier.verify(msg, sig)
    }
}

/// A parsed, signature-checked checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    /// The whole note as stored.
    pub note: String,
}

/// The checkpoint body: `<origin>\n<size>\n<base64 root>\n`.
pub fn checkpoint_text(origin: &str, size: u64, root: &Hash) -> String {
    format!("{origin}\n{size}\n{}\n", B64.encode(root))
}

/// Parse a checkpoint note and check that one of `keys` signed it. With no keys only the
/// syntax is checked.
pub fn open_checkpoint(note: &str, keys: &[VerifierKey]) -> Result<Checkpoint, String> {
    let parsed = Note::from_bytes(note.as_bytes()).map_err(|e| format!("malformed note: {e}"))?;
    if !keys.is_empty() {
        let list = VerifierList::new(
            keys.iter()
                .map(|k| Box::new(k.verifier.clone()) as Box<dyn signed_note::Verifier>)
                .collect(),
        );
        parsed.verify(&list).map_err(|e| match e {
            signed_note::NoteError::UnverifiedNote => {
                "not signed by a trusted key (forged or signed with another key)".to_string()
            }
            other => format!("bad signature: {other}"),
        })?;
    }
    let cp = tlog_tiles::Checkpoint::from_bytes(parsed.text())
        .map_err(|e| format!("malformed checkpoint body: {e}"))?;
    Ok(Checkpoint {
        origin: cp.origin().to_string(),
        size: cp.size(),
        root: cp.hash().0,
        note: note.to_string(),
    })
}

/// A member state's HMAC-SHA256 key: a file of hex (64+ digits) or 32+ raw bytes.
pub fn load_hmac_key(path: &Path) -> Result<Vec<u8>, AuditError> {
    let raw =
        std::fs::read(path).map_err(|e| AuditError::Key(format!("{}: {e}", path.display())))?;
    parse_hmac_key(&raw).map_err(|e| AuditError::Key(format!("{}: {e}", path.display())))
}

pub fn parse_hmac_key(raw: &[u8]) -> Result<Vec<u8>, String> {
    let trimmed = std::str::from_utf8(raw).map(str::trim).unwrap_or("");
    if trimmed.len() >= 64 && trimmed.bytes().all(|b| b.is_ascii_hexdigit()) {
        return hex::decode(trimmed).map_err(|e| format!("bad hex: {e}"));
    }
    if raw.len() >= 32 {
        return Ok(raw.to_vec());
    }
    Err("HMAC key must be 64+ hex digits or 32+ raw bytes".into())
}

/// HMAC-SHA256 of `data` under `key`, hex.
pub fn hmac_hex(key: &[u8], data: &[u8]) -> String {
    HmacKey::new(key).map(|k| k.hex(data)).unwrap_or_default()
}

/// An HMAC-SHA256 key with its inner and outer pads already absorbed: each MAC then
/// costs two compressions fewer than keying afresh (the gateway computes one per
/// request).
#[derive(Clone)]
pub struct HmacKey(Hmac<Sha256>);

impl HmacKey {
    /// HMAC accepts keys of any length; the error is the library's signature only.
    pub fn new(key: &[u8]) -> Result<Self, AuditError> {
        Hmac::<Sha256>::new_from_slice(key)
            .map(HmacKey)
            .map_err(|e| AuditError::Key(format!("HMAC key: {e}")))
    }

    /// HMAC-SHA256 of `data`, hex.
    pub fn hex(&self, data: &[u8]) -> String {
        let mut mac = self.0.clone();
        mac.update(data);
        crate::hexstr(mac.finalize().into_bytes())
    }
}
