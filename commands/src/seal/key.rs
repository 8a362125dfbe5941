//! Seal keys: Ed25519 (RFC 8032). A key is named by its id, `ed25519:`
//! followed by the first 16 hex digits of the SHA-256 of its 32-byte public
//! key; each seal names the key that signed it, so a key can be replaced and
//! the seals it signed still verify against its public key.
//!
//! Text forms: a secret key is its 32-byte seed, a public key its 32 bytes,
//! each in standard base64 (RFC 4648, padded) or 64 hex digits.

use std::fmt;

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// A key that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Neither base64 nor hex.
    #[error("a seal key is 32 bytes in base64 or 64 hex digits; this is neither")]
    Encoding,
    /// The wrong number of bytes.
    #[error("a seal key is 32 bytes; this one has {0}")]
    Length(usize),
    /// Bytes that are no Ed25519 public key.
    #[error("these 32 bytes are not an Ed25519 public key")]
    NotAPoint,
}

fn decode(text: &str) -> Result<[u8; 32], KeyError> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).map_err(|_| KeyError::Encoding)?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| KeyError::Encoding)?
    };
    let len = bytes.len();
    bytes.try_into().map_err(|_| KeyError::Length(len))
}

/// The id of the key whose public key is `public`.
pub fn key_id(public: &[u8; 32]) -> String {
    format!("ed25519:{}", &hex::encode(Sha256::digest(public))[..16])
}

/// A signing key (secret). Its `Debug` shows the id only.
#[derive(Clone)]
pub struct SealKey {
    signing: SigningKey,
    public: PublicKey,
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealKey")
            .field("id", &self.public.id)
            .finish_non_exhaustive()
    }
}

impl SealKey {
    /// The key whose 32-byte seed `text` spells (base64 or hex).
    pub fn from_secret(text: &str) -> Result<Self, KeyError> {
        Ok(Self::from_seed(&decode(text)?))
    }

    fn from_seed(seed: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(seed);
        let public = PublicKey::from_verifying(signing.verifying_key());
        Self { signing, public }
    }

    /// A new random key.
    pub fn generate() -> Self {
        let seed: [u8; 32] = rand::random();
        Self::from_seed(&seed)
    }

    /// The secret's text form (base64): keep it secret.
    pub fn secret_text(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.signing.to_bytes())
    }

    /// Its public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.public.id
    }

    /// The signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }
}

/// A public key, to verify seals with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    id: String,
}

impl PublicKey {
    fn from_verifying(key: VerifyingKey) -> Self {
        let id = key_id(key.as_bytes());
        Self { key, id }
    }

    /// The public key `text` spells (base64 or hex).
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let bytes = decode(text)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::NotAPoint)?;
        Ok(Self::from_verifying(key))
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its text form (base64).
    pub fn text(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.key.as_bytes())
    }

    /// Whether `signature` is this key's signature of `message` (strict
    /// RFC 8032 verification: no malleable signatures, no weak keys).
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(signature) = Signature::from_slice(signature) else {
            return false;
        };
        self.key.verify_strict(message, &signature).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_8032_test_1_signs_as_the_rfc_prints() {
        // RFC 8032 §7.1, TEST 1 (empty message).
        let key = SealKey::from_secret(
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        )
        .unwrap();
        assert_eq!(
            hex::encode(
                base64::engine::general_purpose::STANDARD
                    .decode(key.public().text())
                    .unwrap()
            ),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        let signature = key.sign(b"");
        assert_eq!(
            hex::encode(signature),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
        assert!(key.public().verifies(b"", &signature));
        assert!(!key.public().verifies(b"x", &signature));
    }

    #[test]
    fn text_forms_round_trip_and_bad_ones_are_refused() {
        let key = SealKey::generate();
        let again = SealKey::from_secret(&key.secret_text()).unwrap();
        assert_eq!(again.id(), key.id());
        assert_eq!(
            PublicKey::parse(&key.public().text()).unwrap(),
            *key.public()
        );
        assert!(key.id().starts_with("ed25519:") && key.id().len() == 24);
        assert_eq!(
            SealKey::from_secret("not a key!").unwrap_err(),
            KeyError::Encoding
        );
        assert_eq!(
            SealKey::from_secret("AAAA").unwrap_err(),
            KeyError::Length(3)
        );
        assert!(!format!("{key:?}").contains(&key.secret_text()));
    }
}
