//! The batch validator never panics, and Ok means every CRC checks.

use proptest::prelude::*;

use crate::{batch, Spec};

fn crcs_check(buf: &[u8]) -> bool {
    let mut rest = buf;
    while !rest.is_empty() {
        if rest.len() < 61 {
            return false;
        }
        let len = i32::from_be_bytes(rest[8..12].try_into().unwrap());
        let total = 12 + len as usize;
        if len < 49 || total > rest.len() {
            return false;
        }
        let stored = u32::from_be_bytes(rest[17..21].try_into().unwrap());
        if crc32c::crc32c(&rest[21..total]) != stored {
            return false;
        }
        rest = &rest[total..];
    }
    true
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(hs) = sluice_log::validate_batches(&bytes) {
            prop_assert!(!hs.is_empty());
            prop_assert!(crcs_check(&bytes));
        }
    }

    #[test]
    fn damaged_valid_batches_are_rejected(
        counts in prop::collection::vec((1i32..10, 0usize..200), 1..4),
        pick in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut buf = Vec::new();
        for (c, p) in &counts {
            buf.extend(batch(&Spec::plain(*c, *p)));
        }
        prop_assert!(sluice_log::validate_batches(&buf).is_ok());
        let i = pick.index(buf.len());
        buf[i] ^= flip;
        // Find the batch-relative position of the damaged byte.
        let mut start = 0;
        for (_, p) in &counts {
            let size = 61 + p;
            if i < start + size {
                break;
            }
            start += size;
        }
        let rel = i - start;
        let outside_crc = rel < 8 || (12..16).contains(&rel);
        let r = sluice_log::validate_batches(&buf);
        if outside_crc {
            // Base offset and leader epoch are the broker's to overwrite.
            prop_assert!(r.is_ok());
        } else {
            prop_assert!(r.is_err(), "damage at batch byte {} accepted", rel);
        }
    }
}
