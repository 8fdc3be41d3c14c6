//! The protobuf codec of every mesh service: prost's, with 1 KiB starting buffers instead of
//! tonic's 8 KiB.
//!
//! Each call holds one encode and one decode buffer for as long as it lasts; for a unary call
//! that is a moment, but a long-lived stream (WatchProfiles, WatchUsers) keeps them for hours,
//! and an 8 KiB encode buffer is most of what an idle stream costs. Buffers still grow to fit a
//! larger message, so only idle streams see a difference.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Bytes each encode and decode buffer starts with.
pub const BUFFER_BYTES: usize = 1024;
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

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
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
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
