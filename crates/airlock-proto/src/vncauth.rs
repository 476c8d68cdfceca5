//! VNC authentication (RFB security type 2) and TigerVNC's password file format.
//!
//! Both use single DES with the bits of each key byte mirrored, as in the original
//! VNC sources; the `des` crate does the cipher, this module only shapes keys.

use des::cipher::{generic_array::GenericArray, BlockEncrypt, KeyInit};
use des::Des;

/// The fixed key TigerVNC's `vncpasswd` uses to obfuscate stored passwords.
const PASSWD_FILE_KEY: [u8; 8] = [23, 82, 107, 6, 35, 78, 88, 7];

fn vnc_key(raw: &[u8]) -> Des {
    let mut key = [0u8; 8];
    for (slot, byte) in key.iter_mut().zip(raw.iter()) {
        *slot = byte.reverse_bits();
    }
    // A DES key is always 8 bytes long: this cannot fail.
    Des::new_from_slice(&key).unwrap_or_else(|_| unreachable!("8-byte DES key"))
}

fn password_block(password: &str) -> [u8; 8] {
    let mut block = [0u8; 8];
    for (slot, byte) in block.iter_mut().zip(password.as_bytes()) {
        *slot = *byte;
    }
    block
}

/// The answer to a 16-byte VncAuth challenge: the challenge encrypted under the
/// password (only its first 8 bytes count).
pub fn challenge_response(password: &str, challenge: &[u8; 16]) -> [u8; 16] {
    let cipher = vnc_key(&password_block(password));
    let mut out = *challenge;
    for chunk in out.chunks_exact_mut(8) {
        cipher.encrypt_block(GenericArray::from_mut_slice(chunk));
    }
    out
}

/// The 8 bytes TigerVNC's `Xvnc -PasswordFile` expects (what `vncpasswd -f` writes).
pub fn obfuscated_password_file(password: &str) -> [u8; 8] {
    let cipher = vnc_key(&PASSWD_FILE_KEY);
    let mut block = password_block(password);
    cipher.encrypt_block(GenericArray::from_mut_slice(&mut block));
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_file_matches_known_vector() {
        // `echo -n password | vncpasswd -f | xxd -p` prints dbd83cfd727a1458.
        assert_eq!(
            obfuscated_password_file("password"),
            [0xdb, 0xd8, 0x3c, 0xfd, 0x72, 0x7a, 0x14, 0x58]
        );
    }

    #[test]
    fn only_first_eight_bytes_of_a_password_count() {
        let challenge = [7u8; 16];
        assert_eq!(
            challenge_response("abcdefgh", &challenge),
            challenge_response("abcdefghXYZ", &challenge)
        );
        assert_ne!(
            challenge_response("abcdefgh", &challenge),
            challenge_response("abcdefgX", &challenge)
        );
    }
}
