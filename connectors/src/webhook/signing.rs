//! Standard Webhooks signatures: `webhook-signature: v1,<base64 HMAC-SHA256(id.timestamp.body)>`,
//! one entry per active secret (space-separated) so receivers keep verifying during rotation.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A signing secret: `whsec_` followed by base64 of 24–64 random bytes.
#[derive(Clone)]
pub struct Secret {
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("whsec_***")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let b64 = s.strip_prefix("whsec_").ok_or("a secret starts with `whsec_` (Standard Webhooks)")?;
        let key = STANDARD.decode(b64).map_err(|e| format!("the part after `whsec_` is not base64 ({e})"))?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!("the key is {} bytes; use 24 to 64 random bytes", key.len()));
        }
        Ok(Secret { key })
    }
}

impl Secret {
    /// A fresh random secret, in its `whsec_` form.
    pub fn generate() -> String {
        let key: [u8; 32] = rand::random();
        format!("whsec_{}", STANDARD.encode(key))
    }

    fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => return String::new(),
        };
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

impl Secret {
    /// Whether any `v1,` signature of `header` was made with this secret (receiver side).
    pub fn verify(&self, msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        let want = self.sign(msg_id, timestamp, body);
        header.split(' ').any(|sig| {
            sig.len() == want.len() && sig.bytes().zip(want.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        })
    }
}

/// The `webhook-signature` header value for `body`, signed with every secret.
pub fn signature_header(secrets: &[Secret], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets.iter().map(|s| s.sign(msg_id, timestamp, body)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_implementation() {
        let raw = Secret::generate();
        let other = Secret::generate();
        let secrets = [raw.parse::<Secret>().unwrap(), other.parse().unwrap()];
        let body = br#"{"hello":"world"}"#;
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let sig = signature_header(&secrets, "a/0/16B3748/2", ts, body);
        assert_eq!(sig.split(' ').count(), 2);
        // Either secret verifies (rotation), with the independent standardwebhooks crate.
        for s in [&raw, &other] {
            let wh = standardwebhooks::Webhook::new(s).unwrap();
            let mut h = axum::http::HeaderMap::new();
            h.insert("webhook-id", "a/0/16B3748/2".parse().unwrap());
            h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
            h.insert("webhook-signature", sig.parse().unwrap());
            wh.verify(body, &h).unwrap();
            // A changed body fails.
            assert!(wh.verify(br#"{"hello":"World"}"#, &h).is_err());
        }
        assert!(secrets[1].verify("a/0/16B3748/2", ts, body, &sig));
        assert!(!secrets[1].verify("a/0/16B3748/3", ts, body, &sig));
        assert!("whsec_short".parse::<Secret>().is_err());
        assert!("nope".parse::<Secret>().unwrap_err().contains("whsec_"));
    }
}
