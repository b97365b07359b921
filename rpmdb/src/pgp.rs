//! A one-line summary of an OpenPGP signature, as `rpm -q --qf '%{RSAHEADER:pgpsig}'` prints
//! it: `RSA/SHA256, Mon Apr  3 18:10:39 2023, Key ID 199e2f91fd431d51`.
//!
//! Only the packet header and the signature's algorithm, time and issuer are read; nothing is
//! verified (the signature was checked by rpm at install time).

/// The summary, or `None` when the bytes are not a signature packet this parser understands.
pub fn summary(packet: &[u8]) -> Option<String> {
    let body = packet_body(packet)?;
    let (pubkey, hash, created, key_id) = match *body.first()? {
        3 => {
            // version, length of hashed material (5), type, time, key id, pubkey algo, hash algo
            let created = u32::from_be_bytes(body.get(3..7)?.try_into().ok()?);
            let key_id: [u8; 8] = body.get(7..15)?.try_into().ok()?;
            (*body.get(15)?, *body.get(16)?, Some(created), Some(key_id))
        }
        4 => {
            let (pubkey, hash) = (*body.get(2)?, *body.get(3)?);
            let hashed_len = usize::from(u16::from_be_bytes(body.get(4..6)?.try_into().ok()?));
            let hashed = body.get(6..6 + hashed_len)?;
            let rest = body.get(6 + hashed_len..)?;
            let unhashed_len = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
            let unhashed = rest.get(2..2 + unhashed_len)?;
            let mut created = None;
            let mut key_id = None;
            for area in [hashed, unhashed] {
                for (kind, data) in subpackets(area) {
                    match kind {
                        2 => {
                            created = created.or(data
                                .get(..4)
                                .and_then(|d| d.try_into().ok())
                                .map(u32::from_be_bytes))
                        }
                        16 => key_id = key_id.or(data.get(..8).and_then(|d| d.try_into().ok())),
                        // Issuer fingerprint (version byte, then the fingerprint): a v4 key id
                        // is its last 8 bytes.
                        33 if data.len() == 21 => key_id = key_id.or(data[13..21].try_into().ok()),
                        _ => {}
                    }
                }
            }
            (pubkey, hash, created, key_id)
        }
        _ => return None,
    };
    Some(format!(
        "{}/{}, {}, Key ID {}",
        pubkey_name(pubkey),
        hash_name(hash),
        created.map_or_else(|| "(no date)".to_owned(), ctime_utc),
        key_id.map_or_else(|| "(none)".to_owned(), hex::encode)
    ))
}

/// The body of the first packet (old or new format header), if it is a signature (tag 2).
fn packet_body(packet: &[u8]) -> Option<&[u8]> {
    let first = *packet.first()?;
    if first & 0x80 == 0 {
        return None;
    }
    if first & 0x40 != 0 {
        // New format: tag in the low 6 bits, then a 1-, 2- or 5-byte length.
        if first & 0x3f != 2 {
            return None;
        }
        let (len, at): (usize, usize) = match *packet.get(1)? {
            l @ 0..=191 => (usize::from(l), 2),
            l @ 192..=223 => (
                (usize::from(l) - 192) * 256 + usize::from(*packet.get(2)?) + 192,
                3,
            ),
            255 => (
                u32::from_be_bytes(packet.get(2..6)?.try_into().ok()?) as usize,
                6,
            ),
            _ => return None, // partial lengths: not used for signatures
        };
        return packet.get(at..at.checked_add(len)?);
    }
    // Old format: tag in bits 2..6, length type in bits 0..2.
    if (first >> 2) & 0x0f != 2 {
        return None;
    }
    let (len, at): (usize, usize) = match first & 0x03 {
        0 => (usize::from(*packet.get(1)?), 2),
        1 => (
            usize::from(u16::from_be_bytes(packet.get(1..3)?.try_into().ok()?)),
            3,
        ),
        2 => (
            u32::from_be_bytes(packet.get(1..5)?.try_into().ok()?) as usize,
            5,
        ),
        _ => (packet.len() - 1, 1), // indeterminate: the rest
    };
    packet.get(at..at.checked_add(len)?)
}

/// (type, data) of each subpacket in an area; stops at the first malformed one.
fn subpackets(mut area: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while let Some(&first) = area.first() {
        let (len, at): (usize, usize) = match first {
            0..=191 => (usize::from(first), 1),
            192..=254 => match area.get(1) {
                Some(&second) => (
                    (usize::from(first) - 192) * 256 + usize::from(second) + 192,
                    2,
                ),
                None => break,
            },
            255 => match area.get(1..5).and_then(|b| b.try_into().ok()) {
                Some(b) => (u32::from_be_bytes(b) as usize, 5),
                None => break,
            },
        };
        let Some(sub) = area
            .get(at..at.saturating_add(len))
            .filter(|s| !s.is_empty())
        else {
            break;
        };
        out.push((sub[0] & 0x7f, &sub[1..]));
        area = &area[at + len..];
    }
    out
}

fn pubkey_name(algo: u8) -> &'static str {
    match algo {
        1..=3 => "RSA",
        17 => "DSA",
        19 => "ECDSA",
        22 => "EdDSA",
        _ => "(unknown)",
    }
}

/// rpm's names of OpenPGP hash algorithms.
pub fn hash_name(algo: u8) -> &'static str {
    match algo {
        1 => "MD5",
        2 => "SHA1",
        3 => "RIPEMD160",
        8 => "SHA256",
        9 => "SHA384",
        10 => "SHA512",
        11 => "SHA224",
        _ => "(unknown)",
    }
}

/// `Mon Apr  3 18:10:39 2023` (ctime layout, UTC).
pub fn ctime_utc(secs: u32) -> String {
    let secs = i64::from(secs);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS.get((month - 1) as usize).copied().unwrap_or("???");
    format!("{weekday} {month_name} {day:>2} {h:02}:{m:02}:{s:02} {year}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctime_layout() {
        assert_eq!(ctime_utc(0), "Thu Jan  1 00:00:00 1970");
        assert_eq!(ctime_utc(1_680_545_439), "Mon Apr  3 18:10:39 2023");
        assert_eq!(ctime_utc(1_643_274_131), "Thu Jan 27 09:02:11 2022");
    }

    #[test]
    fn v4_signature_with_issuer() {
        // new-format packet, tag 2; v4, type 0, RSA, SHA256; hashed: creation time; unhashed: issuer.
        let mut body = vec![4, 0, 1, 8];
        let hashed = [5u8, 2, 0x64, 0x2b, 0x16, 0x9f];
        body.extend_from_slice(&(hashed.len() as u16).to_be_bytes());
        body.extend_from_slice(&hashed);
        let unhashed = [9u8, 16, 0x19, 0x9e, 0x2f, 0x91, 0xfd, 0x43, 0x1d, 0x51];
        body.extend_from_slice(&(unhashed.len() as u16).to_be_bytes());
        body.extend_from_slice(&unhashed);
        body.extend_from_slice(&[0xab, 0xcd, 0, 0]);
        let mut packet = vec![0xc2, body.len() as u8];
        packet.extend(body);
        assert_eq!(
            summary(&packet).unwrap(),
            "RSA/SHA256, Mon Apr  3 18:10:39 2023, Key ID 199e2f91fd431d51"
        );
        for cut in 0..packet.len() {
            let _ = summary(&packet[..cut]);
        }
        assert_eq!(summary(b"\x00garbage"), None);
    }
}
