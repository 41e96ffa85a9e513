//! Kafka's record-batch compression codecs, as its clients write them.
//!
//! A RecordBatch v2 names its codec in the low three bits of its
//! attributes and compresses everything after the 61-byte header. This
//! crate is the one place that knows the codecs and their framings: the
//! Kafka front end walks a producer's compressed records through
//! [`decoder`] to validate them, and the log cleaner decompresses with
//! [`decompress`] and writes the retained records back with [`compress`].
//!
//! Every decoder is bounded by a cap on the bytes it may produce, so a
//! small "bomb" batch costs at most that much work and memory.

use std::io::{self, Read};

/// Largest zstd window a batch may ask the decoder for: 2^27 (128 MiB), as
/// Kafka's broker allows, since Java producers at levels 20-22 use it. The
/// decoder reserves it, but only the pages the records fill become
/// resident, and they are bounded by the decompressed-size cap.
const ZSTD_WINDOW_LOG_MAX: u32 = 27;
/// The header of the xerial framing Java producers put around snappy blocks
/// (magic, version 1, compatible with 1), matched whole as consumers that
/// are not Java match it; librdkafka sends one raw snappy block instead.
const XERIAL_HEADER: &[u8; 16] = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01";
/// Snappy's largest expansion, rounded up.
const SNAPPY_MAX_EXPANSION: usize = 22;
/// Uncompressed bytes per xerial snappy block, as Kafka's Java producer.
const XERIAL_BLOCK: usize = 32 * 1024;
/// The attribute bits that name the codec.
const CODEC_MASK: i16 = 0x07;
/// zstd's default level, which Kafka's producer uses too.
const ZSTD_LEVEL: i32 = 3;

/// A batch's compression codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

/// Why a batch's records cannot be decompressed or compressed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unknown compression codec {0}")]
    Unknown(i16),
    #[error("lz4 frame: {0}")]
    Lz4Frame(&'static str),
    #[error("{codec} stream: {source}")]
    Stream {
        codec: &'static str,
        source: io::Error,
    },
    #[error("records exceed the decompressed-size limit of {0} bytes")]
    TooLarge(u64),
}

impl Codec {
    /// The codec a batch's attributes name.
    pub fn from_attributes(attributes: i16) -> Result<Codec, CodecError> {
        Ok(match attributes & CODEC_MASK {
            0 => Codec::None,
            1 => Codec::Gzip,
            2 => Codec::Snappy,
            3 => Codec::Lz4,
            4 => Codec::Zstd,
            other => return Err(CodecError::Unknown(other)),
        })
    }

    /// The attribute bits of this codec.
    pub fn attribute_bits(self) -> i16 {
        match self {
            Codec::None => 0,
            Codec::Gzip => 1,
            Codec::Snappy => 2,
            Codec::Lz4 => 3,
            Codec::Zstd => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Gzip => "gzip",
            Codec::Snappy => "snappy",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }

    fn stream(self, source: io::Error) -> CodecError {
        CodecError::Stream {
            codec: self.name(),
            source,
        }
    }
}

/// A reader of the records `body` (a batch's bytes after its header)
/// holds once decompressed. Snappy blocks that claim more than `cap`
/// bytes are refused before their buffer is allocated; the other codecs
/// stream, and the caller bounds what it reads (as [`decompress`] does).
pub fn decoder<'a>(
    codec: Codec,
    body: &'a [u8],
    cap: u64,
) -> Result<Box<dyn Read + 'a>, CodecError> {
    Ok(match codec {
        Codec::None => Box::new(body),
        Codec::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(body)),
        Codec::Snappy => Box::new(Snappy::new(body, cap)),
        Codec::Lz4 => {
            lz4_frame(body).map_err(CodecError::Lz4Frame)?;
            Box::new(lz4::Decoder::new(body).map_err(|e| codec.stream(e))?)
        }
        Codec::Zstd => {
            let mut d =
                zstd::stream::read::Decoder::with_buffer(body).map_err(|e| codec.stream(e))?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(|e| codec.stream(e))?;
            Box::new(d)
        }
    })
}

/// Decompresses `body` into `out` (cleared first); at most `cap` bytes.
pub fn decompress(
    codec: Codec,
    body: &[u8],
    cap: u64,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    out.clear();
    if codec == Codec::None {
        if body.len() as u64 > cap {
            return Err(CodecError::TooLarge(cap));
        }
        out.extend_from_slice(body);
        return Ok(());
    }
    let reader = decoder(codec, body, cap)?;
    reader
        .take(cap.saturating_add(1))
        .read_to_end(out)
        .map_err(|e| codec.stream(e))?;
    if out.len() as u64 > cap {
        return Err(CodecError::TooLarge(cap));
    }
    Ok(())
}

/// Compresses `raw` (records) with `codec` into `out` (cleared first), in
/// the framing Kafka's Java producer writes, which every client reads.
pub fn compress(codec: Codec, raw: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
    compress_at(codec, None, raw, out)
}

/// [`compress`] at a codec level (Kafka's `compression.<codec>.level`:
/// gzip 1-9, lz4 1-17, zstd -131072..22); None is the codec's default,
/// which is what Kafka's producer uses too. Snappy has no levels.
pub fn compress_at(
    codec: Codec,
    level: Option<i32>,
    raw: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    out.clear();
    let io = |e: io::Error| codec.stream(e);
    match codec {
        Codec::None => out.extend_from_slice(raw),
        Codec::Gzip => {
            let level = level
                .and_then(|l| u32::try_from(l).ok())
                .filter(|l| (1..=9).contains(l))
                .map_or_else(flate2::Compression::default, flate2::Compression::new);
            let mut e = flate2::write::GzEncoder::new(std::mem::take(out), level);
            io::Write::write_all(&mut e, raw).map_err(io)?;
            *out = e.finish().map_err(io)?;
        }
        Codec::Snappy => {
            out.extend_from_slice(XERIAL_HEADER);
            let mut enc = snap::raw::Encoder::new();
            let mut block = Vec::new();
            for chunk in raw.chunks(XERIAL_BLOCK) {
                block.resize(snap::raw::max_compress_len(chunk.len()), 0);
                let n = enc
                    .compress(chunk, &mut block)
                    .map_err(|e| io(io::Error::other(e)))?;
                let len = i32::try_from(n).map_err(|e| io(io::Error::other(e)))?;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(block.get(..n).unwrap_or_default());
            }
        }
        Codec::Lz4 => {
            // Independent blocks: Kafka's Java consumers refuse linked ones.
            let mut builder = lz4::EncoderBuilder::new();
            builder.block_mode(lz4::BlockMode::Independent);
            if let Some(l) = level.and_then(|l| u32::try_from(l).ok()) {
                builder.level(l);
            }
            let mut e = builder.build(std::mem::take(out)).map_err(io)?;
            io::Write::write_all(&mut e, raw).map_err(io)?;
            let (buf, done) = e.finish();
            done.map_err(io)?;
            *out = buf;
        }
        Codec::Zstd => {
            *out = zstd::bulk::compress(raw, level.unwrap_or(ZSTD_LEVEL)).map_err(io)?;
        }
    }
    Ok(())
}

/// The frame around an lz4 batch, as Kafka's Java consumers read it: one
/// frame of independent blocks (they refuse linked ones), no dictionary,
/// ending with its end mark (and content checksum when flagged) exactly at
/// the batch's end. The decoder alone takes a frame cut before its end mark
/// for a whole one.
fn lz4_frame(body: &[u8]) -> Result<(), &'static str> {
    const MAGIC: [u8; 4] = [0x04, 0x22, 0x4d, 0x18];
    let flg = match body {
        [m0, m1, m2, m3, flg, ..] if [*m0, *m1, *m2, *m3] == MAGIC => *flg,
        _ => return Err("no frame header"),
    };
    if flg >> 6 != 1 || flg & 0x03 != 0 {
        return Err("unsupported version, reserved bits or dictionary");
    }
    if flg & 0x20 == 0 {
        return Err("dependent blocks (Kafka's consumers need independent ones)");
    }
    let block_checksum = if flg & 0x10 != 0 { 4 } else { 0 };
    let content_size = if flg & 0x08 != 0 { 8 } else { 0 };
    let content_checksum = if flg & 0x04 != 0 { 4 } else { 0 };
    // Magic, FLG, BD, optional content size, header checksum.
    let mut at = 4 + 1 + 1 + content_size + 1;
    loop {
        let word = body
            .get(at..at + 4)
            .ok_or("cut short before its end mark")?;
        at += 4;
        let size = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) & 0x7fff_ffff;
        if size == 0 {
            break;
        }
        at = at
            .checked_add(size as usize + block_checksum)
            .ok_or("block size out of range")?;
    }
    if at + content_checksum != body.len() {
        return Err("bytes missing or left over after its end mark");
    }
    Ok(())
}

/// Snappy as Kafka's clients write it: xerial-framed blocks (Java) or one
/// raw block (librdkafka), decompressed a block at a time.
struct Snappy<'a> {
    input: &'a [u8],
    framed: bool,
    block: Vec<u8>,
    at: usize,
    budget: u64,
}

impl<'a> Snappy<'a> {
    fn new(body: &'a [u8], budget: u64) -> Self {
        let framed = body.starts_with(XERIAL_HEADER);
        Snappy {
            input: body
                .get(XERIAL_HEADER.len()..)
                .filter(|_| framed)
                .unwrap_or(body),
            framed,
            block: Vec::new(),
            at: 0,
            budget,
        }
    }

    fn next_block(&mut self) -> io::Result<()> {
        let broken = |what: &str| io::Error::other(format!("snappy: {what}"));
        let compressed = if self.framed {
            let len = self
                .input
                .get(..4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .and_then(|b| usize::try_from(i32::from_be_bytes(b)).ok())
                .ok_or_else(|| broken("truncated block length"))?;
            let block = self
                .input
                .get(4..4 + len)
                .ok_or_else(|| broken("block overruns the batch"))?;
            self.input = self.input.get(4 + len..).unwrap_or_default();
            block
        } else {
            std::mem::take(&mut self.input)
        };
        let size = snap::raw::decompress_len(compressed).map_err(|e| broken(&e.to_string()))?;
        // Snappy expands at most about 21 times (a 3-byte copy of 64
        // bytes); a block that claims more is refused before its buffer is
        // allocated.
        if size / SNAPPY_MAX_EXPANSION > compressed.len() {
            return Err(broken(&format!(
                "a block of {} bytes claims {size} decompressed",
                compressed.len()
            )));
        }
        if size as u64 > self.budget {
            return Err(broken(&format!(
                "a block of {size} bytes exceeds the decompressed-size limit"
            )));
        }
        self.budget -= size as u64;
        self.block.clear();
        self.block.resize(size, 0);
        snap::raw::Decoder::new()
            .decompress(compressed, &mut self.block)
            .map_err(|e| broken(&e.to_string()))?;
        self.at = 0;
        Ok(())
    }
}

impl Read for Snappy<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.block.len() {
            if self.input.is_empty() {
                return Ok(0);
            }
            self.next_block()?;
        }
        let k = out.len().min(self.block.len() - self.at);
        out[..k].copy_from_slice(&self.block[self.at..self.at + k]);
        self.at += k;
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips_and_the_cap_holds() {
        let raw: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for codec in [
            Codec::None,
            Codec::Gzip,
            Codec::Snappy,
            Codec::Lz4,
            Codec::Zstd,
        ] {
            let mut packed = Vec::new();
            compress(codec, &raw, &mut packed).unwrap();
            let mut back = Vec::new();
            decompress(codec, &packed, raw.len() as u64, &mut back).unwrap();
            assert_eq!(back, raw, "{codec:?}");
            assert!(
                matches!(
                    decompress(codec, &packed, raw.len() as u64 - 1, &mut back),
                    Err(CodecError::TooLarge(_)) | Err(CodecError::Stream { .. })
                ),
                "{codec:?} exceeded its cap"
            );
            assert_eq!(
                Codec::from_attributes(codec.attribute_bits()).unwrap(),
                codec
            );
        }
        assert!(matches!(
            Codec::from_attributes(5),
            Err(CodecError::Unknown(5))
        ));
    }

    #[test]
    fn levels_change_the_bytes_not_the_records() {
        let raw: Vec<u8> = (0..100_000u32)
            .flat_map(|i| format!("record {} of {}\n", i % 977, i % 13).into_bytes())
            .collect();
        for (codec, fast, slow) in [
            (Codec::Gzip, 1, 9),
            (Codec::Lz4, 1, 12),
            (Codec::Zstd, -5, 19),
        ] {
            let (mut a, mut b, mut back) = (Vec::new(), Vec::new(), Vec::new());
            compress_at(codec, Some(fast), &raw, &mut a).unwrap();
            compress_at(codec, Some(slow), &raw, &mut b).unwrap();
            assert!(b.len() < a.len(), "{codec:?}: {} vs {}", b.len(), a.len());
            for packed in [&a, &b] {
                decompress(codec, packed, raw.len() as u64, &mut back).unwrap();
                assert_eq!(back, raw, "{codec:?}");
            }
        }
    }

    #[test]
    fn a_raw_snappy_block_reads_like_a_framed_one() {
        let raw = b"librdkafka sends one raw block".repeat(100);
        let block = snap::raw::Encoder::new().compress_vec(&raw).unwrap();
        let mut back = Vec::new();
        decompress(Codec::Snappy, &block, 1 << 20, &mut back).unwrap();
        assert_eq!(back, raw);
    }
}
