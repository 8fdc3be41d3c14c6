//! The protobuf codec of every mesh service: prost's, with small starting buffers instead of
//! tonic's 8 KiB (160 B to encode, 1 KiB to decode).
//!
//! Each call holds one encode and one decode buffer for as long as it lasts; for a unary call
//! that is a moment, but a long-lived stream (WatchProfiles, WatchUsers) keeps them for hours,
//! and an 8 KiB encode buffer is most of what an idle stream costs. A WatchProfiles event with
//! a short name and bio (the bench's) is 132 bytes framed: a 160-byte encode buffer (one of
//! jemalloc's size classes) holds one, and
//! once the event has been written out its room is used again for the next. Starting at
//! 160 B instead of 256 B took about 95 B off each subscriber (4,190 → 4,096 B at 10,000,
//! 4,152 → 4,051 B at 100,000; `mesh bench watch`). Buffers still grow to fit a larger
//! message: a unary answer over 155 bytes costs one more allocation, as it did over 251.
//!
//! [`Encoded`] is a message encoded once and sent as those bytes to any number of callers: a
//! server method whose answers many streams share (WatchProfiles) is generated with it as its
//! response type (`build.rs`), so each event is encoded once per relay rather than once per
//! subscriber. tonic has no per-method codec and no pre-encoded messages; prost encodes a
//! message as its fields' bytes, so a type whose fields' bytes are already at hand is a
//! `prost::Message` like any other, and tonic's own codec sends it.

use std::{fmt, marker::PhantomData};

use prost::bytes::{BufMut, Bytes};

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Bytes each encode buffer starts with.
pub const ENCODE_BUFFER_BYTES: usize = 160;
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

/// A message of type `M`, encoded once: cloning it shares the bytes, and encoding it writes
/// them as they are. On the wire it is `M`; a client decodes it as `M`.
pub struct Encoded<M> {
    bytes: Bytes,
    message: PhantomData<fn() -> M>,
}

impl<M: prost::Message> Encoded<M> {
    /// `message`, encoded.
    pub fn new(message: &M) -> Self {
        Self::from_bytes(Bytes::from(message.encode_to_vec()))
    }
}

impl<M> Encoded<M> {
    fn from_bytes(bytes: Bytes) -> Self {
        Self {
            bytes,
            message: PhantomData,
        }
    }

    /// The encoded bytes (shared by every clone).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The message again.
    pub fn to_message(&self) -> Result<M, prost::DecodeError>
    where
        M: prost::Message + Default,
    {
        M::decode(self.bytes.clone())
    }
}

impl<M> Clone for Encoded<M> {
    fn clone(&self) -> Self {
        Self::from_bytes(self.bytes.clone())
    }
}

impl<M> Default for Encoded<M> {
    fn default() -> Self {
        Self::from_bytes(Bytes::new())
    }
}

impl<M> fmt::Debug for Encoded<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoded")
            .field("type", &std::any::type_name::<M>())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl<M> PartialEq for Encoded<M> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl<M: prost::Message + Default> prost::Message for Encoded<M> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.bytes);
    }

    /// Refused: an `Encoded` is only sent, never decoded (a server answers with it; its
    /// clients decode `M`). Decoding one field at a time would lose fields set back to their
    /// default and cost a copy of everything so far per field.
    fn merge_field(
        &mut self,
        _tag: u32,
        _wire_type: prost::encoding::WireType,
        _buf: &mut impl prost::bytes::Buf,
        _ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // prost has no other public way to make a `DecodeError` with a message of one's own.
        #[allow(deprecated)]
        Err(prost::DecodeError::new(
            "an Encoded message is only sent: decode the message type itself",
        ))
    }

    fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    fn clear(&mut self) {
        self.bytes = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::Encoded;

    /// An encoded message goes out as the same bytes as the message, and comes back whole.
    #[test]
    fn encoded_is_the_message_on_the_wire() {
        let message = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        };
        let encoded = Encoded::new(&message);
        assert_eq!(encoded.encode_to_vec(), message.encode_to_vec());
        assert_eq!(encoded.encoded_len(), message.encoded_len());
        assert_eq!(encoded.to_message().expect("decodes"), message);
        // It is only sent: decoding bytes as an `Encoded` is refused.
        assert!(
            <Encoded<prost_types::Timestamp> as prost::Message>::decode(
                &message.encode_to_vec()[..]
            )
            .is_err()
        );
        // Clones share the bytes.
        assert_eq!(encoded.clone().bytes().as_ptr(), encoded.bytes().as_ptr());
    }
}
