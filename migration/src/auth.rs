//! The pre-shared key and the mutual-authentication handshake that starts every connection.
//!
//! ```text
//! client (destination)                          server (source)
//!   Hello { channel, migration_id, features, client_nonce }  ->
//!                     <-  Challenge { features, server_nonce, server_proof }
//!   Proof { client_proof }                                   ->
//!                     <-  Accepted            (or Rejected { code })
//! ```
//!
//! Each proof is keyed BLAKE3 under the pre-shared key over a label naming the prover's role,
//! the version, the channel, the migration id, both feature words and both nonces, so a proof
//! is bound to this one connection and can be neither replayed nor reflected. Proofs are
//! compared in constant time. Both sides prove the key: a client talking to a fake source
//! refuses its challenge before sending anything but its Hello.
//!
//! After `Accepted` each direction has its own frame key, `blake3::derive_key` of a context
//! naming the direction over `psk ‖ client_nonce ‖ server_nonce ‖ channel ‖ migration_id`.
//!
//! No confidentiality: frames are authenticated, not encrypted (see
//! `docs/migration-protocol.md`).

use crate::frame::{constant_time_eq, Direction, MacState};
use std::io::{Read, Write};
use std::path::Path;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `"VMPM"` as a little-endian u32: the first four bytes of every handshake record.
pub const HANDSHAKE_MAGIC: u32 = u32::from_le_bytes(*b"VMPM");
/// Feature bits this implementation knows (none yet; every extension gets one).
pub const FEATURES: u64 = 0;

const SERVER_PROOF_LABEL: &[u8] = b"vmpager-migration v1 server proof";
const CLIENT_PROOF_LABEL: &[u8] = b"vmpager-migration v1 client proof";
const C2S_CONTEXT: &str = "vmpager-migration v1 frame key client-to-server";
const S2C_CONTEXT: &str = "vmpager-migration v1 frame key server-to-client";

/// Handshake and key errors.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A handshake record does not start with [`HANDSHAKE_MAGIC`] (not a migration peer).
    #[error("not a vmpager migration handshake (bad magic {0:#x})")]
    BadMagic(u32),
    /// The peer speaks another protocol version.
    #[error("unsupported migration protocol version {0}")]
    UnsupportedVersion(u16),
    /// A record of another kind than the handshake step expects.
    #[error("unexpected handshake record kind {0}")]
    UnexpectedRecord(u8),
    /// A field that must be zero is not, or a value is out of range.
    #[error("malformed handshake record")]
    Malformed,
    /// The peer's proof does not verify: it does not hold this migration's key.
    #[error("the peer failed to prove the migration key")]
    BadProof,
    /// The server knows no migration with this id.
    #[error("unknown migration {0}")]
    UnknownMigration(u64),
    /// The server refused the handshake.
    #[error("the server refused the handshake ({0:?})")]
    Rejected(RejectCode),
    /// Reading or writing the connection failed (or timed out).
    #[error("handshake I/O failed")]
    Io(#[source] std::io::Error),
    /// A key file could not be read.
    #[error("cannot read key file {path}")]
    KeyFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        error: std::io::Error,
    },
    /// A key is not 64 hex digits.
    #[error("a migration key must be 64 hex digits")]
    KeyFormat,
    /// The system's random number generator failed.
    #[error("getrandom failed")]
    Random(#[source] std::io::Error),
}

impl AuthError {
    /// The peer sent something that is not a valid handshake, or could not prove the key.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            AuthError::BadMagic(_)
                | AuthError::UnsupportedVersion(_)
                | AuthError::UnexpectedRecord(_)
                | AuthError::Malformed
                | AuthError::BadProof
                | AuthError::UnknownMigration(_)
        )
    }

    /// The connection failed below the handshake (closed, reset, timed out): reconnecting may
    /// work.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AuthError::Io(_))
    }
}

/// Why a server refused a handshake (`Rejected.code`). `0` is reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum RejectCode {
    /// The Hello was malformed or of another version.
    BadHello = 1,
    /// No migration with that id.
    UnknownMigration = 2,
    /// The client's proof did not verify.
    BadProof = 3,
    /// A code this version does not know.
    Other = 0xffff_ffff,
}

impl RejectCode {
    fn from_u32(v: u32) -> RejectCode {
        match v {
            1 => RejectCode::BadHello,
            2 => RejectCode::UnknownMigration,
            3 => RejectCode::BadProof,
            _ => RejectCode::Other,
        }
    }
}

/// A migration's 32-byte pre-shared key. Its `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// The key with these bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        Key(bytes)
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A fresh random key from `getrandom(2)`.
    pub fn generate() -> Result<Key, AuthError> {
        let mut k = [0; 32];
        random(&mut k)?;
        Ok(Key(k))
    }

    /// Parses 64 hex digits (either case); surrounding whitespace is ignored.
    pub fn from_hex(text: &str) -> Result<Key, AuthError> {
        let t = text.trim().as_bytes();
        if t.len() != 64 {
            return Err(AuthError::KeyFormat);
        }
        let digit = |c: u8| (c as char).to_digit(16).ok_or(AuthError::KeyFormat);
        let mut k = [0; 32];
        for (i, pair) in t.chunks_exact(2).enumerate() {
            k[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
        }
        Ok(Key(k))
    }

    /// The key as 64 lowercase hex digits (what [`Key::read_file`] reads).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads a key file: 64 hex digits, optionally followed by a newline.
    pub fn read_file(path: &Path) -> Result<Key, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|error| AuthError::KeyFile {
            path: path.display().to_string(),
            error,
        })?;
        Key::from_hex(&text)
    }
}

/// Fills `buf` from `getrandom(2)`.
pub fn random(buf: &mut [u8]) -> Result<(), AuthError> {
    let mut at = 0;
    while at < buf.len() {
        match rustix::rand::getrandom(&mut buf[at..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => at += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(AuthError::Random(e.into())),
        }
    }
    Ok(())
}

/// Which of the two connections of a migration this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ChannelKind {
    /// Fault requests and their pages; latency first.
    Urgent = 1,
    /// The background push of every page not yet received.
    Bulk = 2,
}

impl ChannelKind {
    fn from_u8(v: u8) -> Option<ChannelKind> {
        match v {
            1 => Some(ChannelKind::Urgent),
            2 => Some(ChannelKind::Bulk),
            _ => None,
        }
    }
}

/// What a completed handshake yields: the connection's identity and frame MAC states.
#[derive(Debug)]
pub struct Session {
    /// The channel.
    pub channel: ChannelKind,
    /// The migration.
    pub migration_id: u64,
    /// Features both sides use (`client & server`).
    pub features: u64,
    /// MAC state of the frames this side sends.
    pub send: MacState,
    /// MAC state of the frames this side receives.
    pub recv: MacState,
}

const KIND_HELLO: u8 = 1;
const KIND_CHALLENGE: u8 = 2;
const KIND_PROOF: u8 = 3;
const KIND_ACCEPTED: u8 = 4;
const KIND_REJECTED: u8 = 5;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RecordHead {
    magic: U32,
    version: U16,
    kind: u8,
    reserved: u8,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct HelloWire {
    channel: u8,
    reserved: [u8; 7],
    migration_id: U64,
    features: U64,
    client_nonce: [u8; 32],
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ChallengeWire {
    features: U64,
    server_nonce: [u8; 32],
    server_proof: [u8; 32],
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RejectedWire {
    code: U32,
    reserved: U32,
}

fn body_len(kind: u8) -> Option<usize> {
    Some(match kind {
        KIND_HELLO => size_of::<HelloWire>(),
        KIND_CHALLENGE => size_of::<ChallengeWire>(),
        KIND_PROOF => 32,
        KIND_ACCEPTED => 0,
        KIND_REJECTED => size_of::<RejectedWire>(),
        _ => return None,
    })
}

fn write_record(s: &mut impl Write, kind: u8, body: &[u8]) -> Result<(), AuthError> {
    let head = RecordHead {
        magic: HANDSHAKE_MAGIC.into(),
        version: crate::PROTOCOL_VERSION.into(),
        kind,
        reserved: 0,
    };
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    s.write_all(&out).map_err(AuthError::Io)?;
    s.flush().map_err(AuthError::Io)
}

/// Reads one record; returns its kind and body.
fn read_record(s: &mut impl Read) -> Result<(u8, Vec<u8>), AuthError> {
    let mut h = [0; 8];
    s.read_exact(&mut h).map_err(AuthError::Io)?;
    let head = RecordHead::read_from_bytes(&h).map_err(|_| AuthError::Malformed)?;
    if head.magic.get() != HANDSHAKE_MAGIC {
        return Err(AuthError::BadMagic(head.magic.get()));
    }
    if head.version.get() != crate::PROTOCOL_VERSION {
        return Err(AuthError::UnsupportedVersion(head.version.get()));
    }
    if head.reserved != 0 {
        return Err(AuthError::Malformed);
    }
    let len = body_len(head.kind).ok_or(AuthError::UnexpectedRecord(head.kind))?;
    let mut body = vec![0; len];
    s.read_exact(&mut body).map_err(AuthError::Io)?;
    Ok((head.kind, body))
}

/// The transcript both proofs and the session keys bind to.
struct Transcript {
    channel: ChannelKind,
    migration_id: u64,
    client_features: u64,
    server_features: u64,
    client_nonce: [u8; 32],
    server_nonce: [u8; 32],
}

impl Transcript {
    fn proof(&self, key: &Key, label: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(key.as_bytes());
        h.update(label);
        h.update(&crate::PROTOCOL_VERSION.to_le_bytes());
        h.update(&[self.channel as u8]);
        h.update(&self.migration_id.to_le_bytes());
        h.update(&self.client_features.to_le_bytes());
        h.update(&self.server_features.to_le_bytes());
        h.update(&self.client_nonce);
        h.update(&self.server_nonce);
        *h.finalize().as_bytes()
    }

    fn frame_key(&self, key: &Key, context: &str) -> [u8; 32] {
        let mut material = Vec::with_capacity(32 * 3 + 9);
        material.extend_from_slice(key.as_bytes());
        material.extend_from_slice(&self.client_nonce);
        material.extend_from_slice(&self.server_nonce);
        material.push(self.channel as u8);
        material.extend_from_slice(&self.migration_id.to_le_bytes());
        blake3::derive_key(context, &material)
    }

    fn session(&self, key: &Key, client: bool) -> Session {
        let c2s = MacState::new(self.frame_key(key, C2S_CONTEXT), Direction::ClientToServer);
        let s2c = MacState::new(self.frame_key(key, S2C_CONTEXT), Direction::ServerToClient);
        let (send, recv) = if client { (c2s, s2c) } else { (s2c, c2s) };
        Session {
            channel: self.channel,
            migration_id: self.migration_id,
            features: self.client_features & self.server_features,
            send,
            recv,
        }
    }
}

/// Runs the client's side of the handshake on `s` (any blocking stream; timeouts are the
/// stream's). On an error the connection must be closed.
pub fn client_handshake(
    s: &mut (impl Read + Write),
    channel: ChannelKind,
    migration_id: u64,
    key: &Key,
) -> Result<Session, AuthError> {
    let mut client_nonce = [0; 32];
    random(&mut client_nonce)?;
    let hello = HelloWire {
        channel: channel as u8,
        reserved: [0; 7],
        migration_id: migration_id.into(),
        features: FEATURES.into(),
        client_nonce,
    };
    write_record(s, KIND_HELLO, hello.as_bytes())?;

    let (kind, body) = read_record(s)?;
    if kind == KIND_REJECTED {
        return Err(rejected(&body));
    }
    if kind != KIND_CHALLENGE {
        return Err(AuthError::UnexpectedRecord(kind));
    }
    let ch = ChallengeWire::read_from_bytes(&body).map_err(|_| AuthError::Malformed)?;
    let t = Transcript {
        channel,
        migration_id,
        client_features: FEATURES,
        server_features: ch.features.get(),
        client_nonce,
        server_nonce: ch.server_nonce,
    };
    if ch.features.get() & !FEATURES != 0 {
        return Err(AuthError::Malformed);
    }
    if !constant_time_eq(&t.proof(key, SERVER_PROOF_LABEL), &ch.server_proof) {
        return Err(AuthError::BadProof);
    }
    write_record(s, KIND_PROOF, &t.proof(key, CLIENT_PROOF_LABEL))?;
    let (kind, body) = read_record(s)?;
    match kind {
        KIND_ACCEPTED => Ok(t.session(key, true)),
        KIND_REJECTED => Err(rejected(&body)),
        k => Err(AuthError::UnexpectedRecord(k)),
    }
}

fn rejected(body: &[u8]) -> AuthError {
    match RejectedWire::read_from_bytes(body) {
        Ok(r) => AuthError::Rejected(RejectCode::from_u32(r.code.get())),
        Err(_) => AuthError::Malformed,
    }
}

fn reject(s: &mut impl Write, code: RejectCode, error: AuthError) -> AuthError {
    let r = RejectedWire {
        code: (code as u32).into(),
        reserved: 0.into(),
    };
    // Best effort: the error that made us refuse is what the caller needs.
    let _ = write_record(s, KIND_REJECTED, r.as_bytes());
    error
}

/// Runs the server's side of the handshake on `s`; `lookup` gives the key of a migration id
/// (`None`: unknown, refused). On an error the connection must be closed.
pub fn server_handshake(
    s: &mut (impl Read + Write),
    lookup: impl Fn(u64) -> Option<Key>,
) -> Result<Session, AuthError> {
    let (kind, body) = match read_record(s) {
        Ok(r) => r,
        Err(e @ AuthError::UnsupportedVersion(_)) => {
            return Err(reject(s, RejectCode::BadHello, e))
        }
        Err(e) => return Err(e),
    };
    if kind != KIND_HELLO {
        return Err(reject(
            s,
            RejectCode::BadHello,
            AuthError::UnexpectedRecord(kind),
        ));
    }
    let hello = HelloWire::read_from_bytes(&body).map_err(|_| AuthError::Malformed)?;
    let channel = ChannelKind::from_u8(hello.channel);
    let Some(channel) = channel.filter(|_| hello.reserved == [0; 7]) else {
        return Err(reject(s, RejectCode::BadHello, AuthError::Malformed));
    };
    let migration_id = hello.migration_id.get();
    let Some(key) = lookup(migration_id) else {
        return Err(reject(
            s,
            RejectCode::UnknownMigration,
            AuthError::UnknownMigration(migration_id),
        ));
    };
    let mut server_nonce = [0; 32];
    random(&mut server_nonce)?;
    let t = Transcript {
        channel,
        migration_id,
        client_features: hello.features.get(),
        server_features: FEATURES & hello.features.get(),
        client_nonce: hello.client_nonce,
        server_nonce,
    };
    let ch = ChallengeWire {
        features: t.server_features.into(),
        server_nonce,
        server_proof: t.proof(&key, SERVER_PROOF_LABEL),
    };
    write_record(s, KIND_CHALLENGE, ch.as_bytes())?;
    let (kind, body) = read_record(s)?;
    if kind != KIND_PROOF {
        return Err(reject(
            s,
            RejectCode::BadHello,
            AuthError::UnexpectedRecord(kind),
        ));
    }
    if !constant_time_eq(&t.proof(&key, CLIENT_PROOF_LABEL), &body) {
        return Err(reject(s, RejectCode::BadProof, AuthError::BadProof));
    }
    write_record(s, KIND_ACCEPTED, &[])?;
    Ok(t.session(&key, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let k = Key::generate().unwrap();
        assert_eq!(Key::from_hex(&format!("{}\n", k.to_hex())).unwrap(), k);
        assert!(Key::from_hex("00").is_err());
        assert!(Key::from_hex(&"g".repeat(64)).is_err());
        assert_eq!(format!("{k:?}"), "Key(..)");
    }

    #[test]
    fn proofs_differ_by_role_and_binding() {
        let t = Transcript {
            channel: ChannelKind::Urgent,
            migration_id: 1,
            client_features: 0,
            server_features: 0,
            client_nonce: [1; 32],
            server_nonce: [2; 32],
        };
        let k = Key::from_bytes([3; 32]);
        assert_ne!(
            t.proof(&k, SERVER_PROOF_LABEL),
            t.proof(&k, CLIENT_PROOF_LABEL)
        );
        let bulk = Transcript {
            channel: ChannelKind::Bulk,
            ..t
        };
        assert_ne!(
            bulk.proof(&k, SERVER_PROOF_LABEL),
            t.proof(&k, SERVER_PROOF_LABEL)
        );
        assert_ne!(t.frame_key(&k, C2S_CONTEXT), t.frame_key(&k, S2C_CONTEXT));
    }
}
