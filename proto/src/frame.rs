//! Framing: owns the byte layout of one frame on a stream — a `u32` big-endian payload length,
//! then the payload — and the size limit checked before any buffer is allocated. What a
//! payload means is [`crate::msg`]'s business.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Default largest payload accepted or sent: 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// The buffer first reserved for a payload. Larger payloads grow the buffer as their bytes
/// actually arrive, so a peer that announces a big frame and then stalls costs little memory.
const INITIAL_RESERVE: usize = 64 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The announced (or, when writing, the given) payload is larger than the maximum.
    #[error("frame of {len} bytes is larger than the maximum of {max} bytes")]
    TooLarge { len: u64, max: usize },
    /// The stream ended inside a frame (in its length prefix or its payload).
    #[error("connection closed in the middle of a frame")]
    Eof,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads one frame's payload. `Ok(None)` is a clean end of stream at a frame boundary.
///
/// Not cancel-safe: dropping the future mid-frame loses the bytes read so far, so callers that
/// time out a read must give up on the stream.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match reader.read(&mut header[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(FrameError::Eof),
            n => got += n,
        }
    }
    let len = u32::from_be_bytes(header);
    // The check that keeps a hostile prefix (up to 4 GiB) from allocating anything.
    if len as u64 > max as u64 {
        return Err(FrameError::TooLarge {
            len: len.into(),
            max,
        });
    }
    let len = len as usize;
    let mut payload = Vec::with_capacity(len.min(INITIAL_RESERVE));
    let read = reader.take(len as u64).read_to_end(&mut payload).await?;
    if read < len {
        return Err(FrameError::Eof);
    }
    Ok(Some(payload))
}

/// Writes one frame (length prefix and payload). Does not flush.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    payload: &[u8],
    max: usize,
) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len as u64 <= max as u64)
        .ok_or(FrameError::TooLarge {
            len: payload.len() as u64,
            max,
        })?;
    writer.write_all(&len.to_be_bytes()).await?;
    writer.write_all(payload).await?;
    Ok(())
}

/// The encoded frame (prefix and payload) as one buffer, for callers that queue frames.
pub fn encode_frame(payload: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len as u64 <= max as u64)
        .ok_or(FrameError::TooLarge {
            len: payload.len() as u64,
            max,
        })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    /// Reads frames until the stream ends or fails.
    async fn read_all(mut bytes: &[u8], max: usize) -> (Vec<Vec<u8>>, Option<FrameError>) {
        let mut frames = Vec::new();
        loop {
            match read_frame(&mut bytes, max).await {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => return (frames, None),
                Err(e) => return (frames, Some(e)),
            }
        }
    }

    #[test]
    fn frames_round_trip() {
        rt().block_on(async {
            let mut buf = Vec::new();
            for payload in [&b""[..], b"a", &[7u8; 1000]] {
                write_frame(&mut buf, payload, 1000).await.expect("write");
            }
            assert_eq!(
                encode_frame(b"a", 10).expect("encode"),
                vec![0, 0, 0, 1, b'a']
            );
            let (frames, err) = read_all(&buf, 1000).await;
            assert!(err.is_none(), "{err:?}");
            assert_eq!(frames, vec![vec![], b"a".to_vec(), vec![7u8; 1000]]);
        });
    }

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        rt().block_on(async {
            let mut buf = Vec::new();
            let err = write_frame(&mut buf, &[0; 11], 10)
                .await
                .expect_err("too big");
            assert!(
                matches!(err, FrameError::TooLarge { len: 11, max: 10 }),
                "{err}"
            );
            assert!(buf.is_empty(), "nothing written for a refused frame");
            assert!(encode_frame(&[0; 11], 10).is_err());

            let (_, err) = read_all(&[0xff, 0xff, 0xff, 0xff], DEFAULT_MAX_FRAME).await;
            match err {
                Some(FrameError::TooLarge { len, max }) => {
                    assert_eq!(len, u32::MAX as u64);
                    assert_eq!(max, DEFAULT_MAX_FRAME);
                }
                other => panic!("expected TooLarge, got {other:?}"),
            }
            // Exactly at the limit is fine, one over is not.
            let (frames, err) = read_all(&[0, 0, 0, 2, 1, 2], 2).await;
            assert!(err.is_none() && frames.len() == 1);
            let (_, err) = read_all(&[0, 0, 0, 3, 1, 2, 3], 2).await;
            assert!(matches!(err, Some(FrameError::TooLarge { len: 3, .. })));
        });
    }

    #[test]
    fn truncation_is_eof_mid_frame_but_a_clean_end_is_not() {
        rt().block_on(async {
            assert!(matches!(read_all(&[], 10).await, (f, None) if f.is_empty()));
            for cut in [&[0u8][..], &[0, 0, 0], &[0, 0, 0, 5, 1, 2]] {
                let (_, err) = read_all(cut, 10).await;
                assert!(matches!(err, Some(FrameError::Eof)), "{cut:?}: {err:?}");
            }
        });
    }

    #[test]
    fn a_stalled_big_frame_does_not_reserve_its_announced_size() {
        rt().block_on(async {
            // Announce 1 MiB, send 10 bytes, end: the reader must not have reserved 1 MiB
            // up front (checked indirectly: it ends with Eof, and the reserve constant is
            // far below the announced length).
            let mut bytes = (DEFAULT_MAX_FRAME as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(&[1; 10]);
            let (_, err) = read_all(&bytes, DEFAULT_MAX_FRAME).await;
            assert!(matches!(err, Some(FrameError::Eof)));
            const { assert!(INITIAL_RESERVE < DEFAULT_MAX_FRAME) };
        });
    }

    proptest! {
        /// Arbitrary streams give frames within the limit and at most one error at the end;
        /// never a panic.
        #[test]
        fn arbitrary_streams_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            max in 0usize..512,
        ) {
            let (frames, _err) = rt().block_on(read_all(&bytes, max));
            let consumed: usize = frames.iter().map(|f| f.len() + HEADER_LEN).sum();
            prop_assert!(consumed <= bytes.len());
            prop_assert!(frames.iter().all(|f| f.len() <= max));
        }

        /// Whatever is written reads back the same.
        #[test]
        fn written_frames_read_back(
            payloads in proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 0..300), 0..10),
        ) {
            let (frames, err) = rt().block_on(async {
                let mut buf = Vec::new();
                for p in &payloads {
                    write_frame(&mut buf, p, 300).await.expect("write");
                }
                read_all(&buf, 300).await
            });
            prop_assert!(err.is_none());
            prop_assert_eq!(frames, payloads);
        }
    }
}
