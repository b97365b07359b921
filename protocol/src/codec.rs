//! Payload encoding: bincode 2 (standard configuration: little endian, variable-length
//! integers), isolated here so the codec can change behind the protocol version. Version 2
//! encodes the model of `message.rs`; version 1 the shapes of `v1.rs` for `Report` and `Nack`
//! (the other messages are the same in both).
//!
//! Decoding is bounded: bincode checks every length prefix against a limit before allocating,
//! and the limit is chosen from the payload's actual size (the next tier up), so a small frame
//! claiming a huge string allocates nothing of the sort.

use bincode::{
    Decode, Encode,
    config::{self, Config},
};

use crate::{
    ProtocolError,
    message::{Ack, ErrorMessage, Hello, Message, MessageType, Nack, Report, Welcome},
    v1,
};

fn encode<T: Encode>(value: &T) -> Result<Vec<u8>, ProtocolError> {
    bincode::encode_to_vec(value, config::standard())
        .map_err(|e| ProtocolError::Encode(e.to_string()))
}

/// The payload bytes of a message in protocol `version` (one [`crate::SUPPORTED_VERSIONS`]).
pub fn encode_payload(version: u16, message: &Message) -> Result<Vec<u8>, ProtocolError> {
    let v1 = version == 1;
    match message {
        Message::Hello(m) => encode(m),
        Message::Welcome(m) => encode(m),
        Message::Report(m) if v1 => {
            encode(&v1::Report::from_model(m).map_err(|e| ProtocolError::Encode(e.to_string()))?)
        }
        Message::Report(m) => encode(m.as_ref()),
        Message::Ack(m) => encode(m),
        Message::Nack(m) if v1 => encode(&v1::Nack::from_model(m)),
        Message::Nack(m) => encode(m),
        Message::Ping(n) | Message::Pong(n) => encode(n),
        Message::Error(m) => encode(m),
    }
}

fn decode_one<T: Decode<()>, C: Config>(
    kind: MessageType,
    bytes: &[u8],
    cfg: C,
) -> Result<T, ProtocolError> {
    let (value, used) =
        bincode::decode_from_slice::<T, C>(bytes, cfg).map_err(|e| ProtocolError::Malformed {
            kind,
            reason: e.to_string(),
        })?;
    if used != bytes.len() {
        return Err(ProtocolError::Malformed {
            kind,
            reason: format!("{} trailing bytes", bytes.len() - used),
        });
    }
    Ok(value)
}

fn decode_with<C: Config>(
    version: u16,
    kind: MessageType,
    bytes: &[u8],
    cfg: C,
) -> Result<Message, ProtocolError> {
    let v1 = version == 1;
    Ok(match kind {
        MessageType::Hello => Message::Hello(decode_one::<Hello, C>(kind, bytes, cfg)?),
        MessageType::Welcome => Message::Welcome(decode_one::<Welcome, C>(kind, bytes, cfg)?),
        MessageType::Report if v1 => {
            let old = decode_one::<v1::Report, C>(kind, bytes, cfg)?;
            let report = old.into_model().map_err(|e| ProtocolError::Malformed {
                kind,
                reason: e.to_string(),
            })?;
            Message::Report(Box::new(report))
        }
        MessageType::Report => {
            Message::Report(Box::new(decode_one::<Report, C>(kind, bytes, cfg)?))
        }
        MessageType::Ack => Message::Ack(decode_one::<Ack, C>(kind, bytes, cfg)?),
        MessageType::Nack if v1 => {
            Message::Nack(decode_one::<v1::Nack, C>(kind, bytes, cfg)?.into_model())
        }
        MessageType::Nack => Message::Nack(decode_one::<Nack, C>(kind, bytes, cfg)?),
        MessageType::Ping => Message::Ping(decode_one::<u64, C>(kind, bytes, cfg)?),
        MessageType::Pong => Message::Pong(decode_one::<u64, C>(kind, bytes, cfg)?),
        MessageType::Error => Message::Error(decode_one::<ErrorMessage, C>(kind, bytes, cfg)?),
    })
}

/// Decodes the payload of a frame whose header announced `version` and `kind`.
pub fn decode_payload(
    version: u16,
    kind: MessageType,
    bytes: &[u8],
) -> Result<Message, ProtocolError> {
    const KIB: usize = 1024;
    let base = config::standard();
    // The limit is at most 4x the payload (and at least 4 KiB).
    match bytes.len() {
        n if n <= KIB => decode_with(version, kind, bytes, base.with_limit::<{ 4 * KIB }>()),
        n if n <= 16 * KIB => decode_with(version, kind, bytes, base.with_limit::<{ 64 * KIB }>()),
        n if n <= 256 * KIB => {
            decode_with(version, kind, bytes, base.with_limit::<{ 1024 * KIB }>())
        }
        n if n <= 4096 * KIB => decode_with(
            version,
            kind,
            bytes,
            base.with_limit::<{ 16 * 1024 * KIB }>(),
        ),
        n if n <= 64 * 1024 * KIB => decode_with(
            version,
            kind,
            bytes,
            base.with_limit::<{ 256 * 1024 * KIB }>(),
        ),
        _ => decode_with(
            version,
            kind,
            bytes,
            base.with_limit::<{ 4096 * 1024 * KIB }>(),
        ),
    }
}

/// The encoded size of `value` in protocol version 2 (for limits on parts of a message).
pub fn encoded_len<T: Encode>(value: &T) -> usize {
    let mut writer = bincode::enc::write::SizeWriter::default();
    match bincode::encode_into_writer(value, &mut writer, config::standard()) {
        Ok(()) => writer.bytes_written,
        Err(_) => usize::MAX,
    }
}
