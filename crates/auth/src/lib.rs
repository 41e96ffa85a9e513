//! `sluice-auth`: what the broker keeps of a user's password. Only a salted
//! SCRAM-SHA-256 credential (RFC 5802, RFC 7677) is stored: `StoredKey` and
//! `ServerKey` derived from the password with PBKDF2, never the password or
//! anything a client could replay. A password given in the clear (AMQP PLAIN
//! and AMQPLAIN) is checked by deriving the same keys again; a SCRAM exchange
//! (Kafka's SASL/SCRAM) checks a client proof against `StoredKey`.
//!
//! A leaf crate: pure functions over bytes, so the metadata quorum can keep
//! credentials as data and every front end checks them the same way.

use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// A salted SCRAM-SHA-256 credential.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub salt: Vec<u8>,
    pub iterations: u32,
    /// `H(HMAC(SaltedPassword, "Client Key"))`.
    pub stored_key: Vec<u8>,
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: Vec<u8>,
}

// The keys are secrets: a log line or a debug dump must not carry them.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("mechanism", &"SCRAM-SHA-256")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl Credential {
    /// Kafka's and RFC 7677's minimum; what `derive` uses.
    pub const ITERATIONS: u32 = 4096;
    const SALT_BYTES: usize = 16;

    /// A new credential for `password`, under a fresh random salt.
    pub fn derive(password: &[u8]) -> Credential {
        let mut salt = vec![0u8; Self::SALT_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        Credential::derive_with(password, salt, Self::ITERATIONS)
    }

    /// The credential for `password` under a given salt and iteration count.
    pub fn derive_with(password: &[u8], salt: Vec<u8>, iterations: u32) -> Credential {
        let salted = salted_password(password, &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        Credential {
            stored_key: Sha256::digest(client_key).to_vec(),
            server_key: hmac(&salted, b"Server Key").to_vec(),
            salt,
            iterations,
        }
    }

    /// Whether `password` is the one this credential was derived from. Costs
    /// `iterations` rounds of PBKDF2: run it off the async workers.
    pub fn verify(&self, password: &[u8]) -> bool {
        let salted = salted_password(password, &self.salt, self.iterations);
        let stored = Sha256::digest(hmac(&salted, b"Client Key"));
        bool::from(stored.as_slice().ct_eq(&self.stored_key))
    }
}

fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations.max(1), &mut out);
    out
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;

    use super::*;

    /// RFC 7677, section 3: user "user", password "pencil". The server's
    /// signature over the exchange is `HMAC(ServerKey, AuthMessage)`, and the
    /// client's proof XOR `HMAC(StoredKey, AuthMessage)` is the ClientKey whose
    /// hash is `StoredKey`: both published values check the derived keys.
    #[test]
    fn derives_the_keys_of_rfc_7677s_example() {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let c = Credential::derive_with(b"pencil", salt, 4096);
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,\
r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,\
c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let server_signature = hmac(&c.server_key, auth_message.as_bytes());
        assert_eq!(
            STANDARD.encode(server_signature),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        let proof = STANDARD
            .decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        let client_signature = hmac(&c.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        assert_eq!(
            Sha256::digest(&client_key).as_slice(),
            c.stored_key.as_slice()
        );
    }

    #[test]
    fn verifies_the_password_and_nothing_else() {
        let c = Credential::derive(b"s3cret");
        assert!(c.verify(b"s3cret"));
        assert!(!c.verify(b"s3cret "));
        assert!(!c.verify(b""));
        // A fresh salt each time: the same password never stores the same keys.
        let again = Credential::derive(b"s3cret");
        assert_ne!(c.salt, again.salt);
        assert_ne!(c.stored_key, again.stored_key);
        assert!(again.verify(b"s3cret"));
    }

    #[test]
    fn survives_the_image_encoding_and_keeps_its_keys_out_of_debug() {
        let c = Credential::derive(b"pw");
        let back: Credential = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert!(back.verify(b"pw"));
        let shown = format!("{c:?}");
        assert!(!shown.contains(&format!("{:?}", c.stored_key)), "{shown}");
    }
}
