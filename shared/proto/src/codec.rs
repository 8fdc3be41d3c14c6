//! The protobuf codec of every mesh service: prost's, with small starting buffers instead of
//! tonic's 8 KiB (256 B to encode, 1 KiB to decode).
//!
//! Each call holds one encode and one decode buffer for as long as it lasts; for a unary call
//! that is a moment, but a long-lived stream (WatchProfiles, WatchUsers) keeps them for hours,
//! and an 8 KiB encode buffer is most of what an idle stream costs. A stream's events are
//! about 130 bytes: a 256-byte encode buffer holds one, and once the event has been written
//! out its room is used again for the next, so a WatchProfiles stream keeps 256 bytes where
//! a 1 KiB buffer kept 1 KiB (`mesh bench watch`). Buffers still grow to fit a larger
//! message, so only idle streams see a difference.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Bytes each encode buffer starts with.
pub const ENCODE_BUFFER_BYTES: usize = 256;
/// Bytes each decode buffer starts with.
pub const DECODE_BUFFER_BYTES: usize = 1024;
/// Bytes encoded before a stream yields to let them be sent (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost encoding with small starting buffers; named by `codec_path` in `build.rs`.
#[derive(Debug, Clone, Copy)]
pub struct MeshCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for MeshCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings(buffer_bytes: usize) -> BufferSettings {
    BufferSettings::new(buffer_bytes, YIELD_THRESHOLD)
}

impl<T, U> Codec for MeshCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings(ENCODE_BUFFER_BYTES))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings(DECODE_BUFFER_BYTES))
    }
}
