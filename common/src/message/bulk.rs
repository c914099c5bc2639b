//! The bulk messages (DATA, STREAM_DATA) read and written without copying their bytes.
//!
//! A receiver that only looks at the bytes (checks them, appends them to a file) borrows them
//! from the frame ([`BulkRef`]), where [`Message::from_frame`] would copy every payload once
//! more; the fields and errors are exactly those of [`Message::from_frame`] (tested against
//! it). A sender writes the bytes straight into its output, after the frame's header and the
//! fields before them ([`BulkHead::encode_into`]): the frame is byte for byte what
//! [`Message::encode_into`] gives for the same message (tested).

use super::codec::{Reader, Wire, Writer};
use super::{Message, MessageError, MessageType};
use crate::frame::{begin_frame, seal_frame, Frame, Header};

/// The fields of a bulk message before its bytes: a frame to write in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkHead {
    /// [`Message::Data`] at `offset`.
    Data {
        /// Offset of the first byte in the stream.
        offset: u64,
    },
    /// [`Message::StreamData`] of stream `id` at `offset`.
    StreamData {
        /// The stream.
        id: u64,
        /// Offset of the first byte.
        offset: u64,
    },
}

/// Why a bulk frame was not written.
#[derive(Debug, PartialEq, Eq)]
pub enum BulkError<E> {
    /// The message does not fit in a frame (or, from [`Message::encode_into`], cannot be
    /// encoded).
    Message(MessageError),
    /// The bytes could not be produced (the filler's error).
    Fill(E),
}

impl BulkHead {
    /// The message type.
    pub fn kind(self) -> MessageType {
        match self {
            BulkHead::Data { .. } => MessageType::Data,
            BulkHead::StreamData { .. } => MessageType::StreamData,
        }
    }

    /// Appends the frame of this message with `len` bytes, session `session`, sequence number
    /// `seq`, to `out`: `fill` writes the bytes in place (they are never copied). On error
    /// nothing is appended.
    pub fn encode_into<E>(
        self,
        session: u32,
        seq: u32,
        len: usize,
        out: &mut Vec<u8>,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), BulkError<E>> {
        // The whole frame at once: the buffer does not grow (and copy) as the bytes go in.
        out.reserve(crate::frame::OVERHEAD + 16 + len);
        let start = begin_frame(out, &Header { kind: self.kind() as u8, flags: 0, session, seq });
        let mut w = Writer::after(self.kind(), std::mem::take(out));
        let fields = match self {
            BulkHead::Data { offset } => offset.put(&mut w, "offset"),
            BulkHead::StreamData { id, offset } => id.put(&mut w, "id").and_then(|()| offset.put(&mut w, "offset")),
        };
        *out = w.finish();
        let bytes_at = out.len();
        let filled = fields.map_err(BulkError::Message).and_then(|()| {
            out.resize(bytes_at + len, 0);
            fill(&mut out[bytes_at..]).map_err(BulkError::Fill)
        });
        if let Err(e) = filled {
            out.truncate(start);
            return Err(e);
        }
        seal_frame(out, start).map_err(|e| BulkError::Message(e.into()))
    }
}

/// A bulk message's fields, its bytes borrowed from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkRef<'a> {
    /// [`Message::Data`].
    Data {
        /// Offset of the first byte in the stream.
        offset: u64,
        /// The bytes.
        bytes: &'a [u8],
    },
    /// [`Message::StreamData`].
    StreamData {
        /// The stream.
        id: u64,
        /// Offset of the first byte.
        offset: u64,
        /// The bytes.
        bytes: &'a [u8],
    },
}

impl<'a> BulkRef<'a> {
    /// The bulk message `frame` carries; `Ok(None)` for a frame of any other type. Errors are
    /// those [`Message::from_frame`] gives for the same frame.
    pub fn from_frame(frame: &'a Frame) -> Result<Option<BulkRef<'a>>, MessageError> {
        let kind = frame.header.kind;
        if kind == MessageType::Data as u8 {
            let mut r = Reader::new(&frame.payload, MessageType::Data);
            let offset = u64::get(&mut r, "offset")?;
            Ok(Some(BulkRef::Data { offset, bytes: r.rest_borrowed() }))
        } else if kind == MessageType::StreamData as u8 {
            let mut r = Reader::new(&frame.payload, MessageType::StreamData);
            let id = u64::get(&mut r, "id")?;
            let offset = u64::get(&mut r, "offset")?;
            Ok(Some(BulkRef::StreamData { id, offset, bytes: r.rest_borrowed() }))
        } else {
            Ok(None)
        }
    }

    /// The owned message (a copy of the bytes).
    pub fn to_message(self) -> Message {
        match self {
            BulkRef::Data { offset, bytes } => Message::Data { offset, bytes: bytes.to_vec() },
            BulkRef::StreamData { id, offset, bytes } => Message::StreamData { id, offset, bytes: bytes.to_vec() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// For any frame, borrowed and owned parsing agree: the same message, or the same
        /// error, or (for other types) no bulk message.
        #[test]
        fn borrowed_parsing_agrees_with_from_frame(
            kind in prop_oneof![Just(MessageType::Data as u8), Just(MessageType::StreamData as u8), any::<u8>()],
            payload in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let frame = Frame::new(kind, 1, 2, payload);
            let owned = Message::from_frame(&frame);
            match BulkRef::from_frame(&frame) {
                Ok(Some(bulk)) => prop_assert_eq!(Ok(bulk.to_message()), owned),
                Ok(None) => prop_assert!(
                    !matches!(owned, Ok(Message::Data { .. }) | Ok(Message::StreamData { .. })),
                    "{:?} was not read as bulk", owned
                ),
                Err(e) => prop_assert_eq!(Err(e), owned),
            }
        }
    }

    proptest! {
        /// A bulk frame written in place is the frame of the same message, to the byte; a
        /// failing filler leaves nothing behind.
        #[test]
        fn written_in_place_equals_the_message_frame(
            stream in any::<Option<u64>>(),
            offset in any::<u64>(),
            bytes in proptest::collection::vec(any::<u8>(), 0..100),
            before in proptest::collection::vec(any::<u8>(), 0..10),
        ) {
            let (head, msg) = match stream {
                None => (BulkHead::Data { offset }, Message::Data { offset, bytes: bytes.clone() }),
                Some(id) => (BulkHead::StreamData { id, offset }, Message::StreamData { id, offset, bytes: bytes.clone() }),
            };
            let mut expected = before.clone();
            msg.encode_into(3, 4, &mut expected).unwrap();
            let mut out = before.clone();
            head.encode_into(3, 4, bytes.len(), &mut out, |b| { b.copy_from_slice(&bytes); Ok::<(), ()>(()) }).unwrap();
            prop_assert_eq!(&out, &expected);
            let failed = head.encode_into(3, 5, bytes.len(), &mut out, |_| Err("no bytes"));
            prop_assert_eq!(failed, Err(BulkError::Fill("no bytes")));
            prop_assert_eq!(out, expected);
        }
    }

    #[test]
    fn a_data_frame_is_borrowed_not_copied() {
        let frame = Message::Data { offset: 9, bytes: vec![1, 2, 3] }.to_frame(1, 1).unwrap();
        let Ok(Some(BulkRef::Data { offset: 9, bytes })) = BulkRef::from_frame(&frame) else {
            panic!("not read as DATA")
        };
        assert_eq!(bytes, [1, 2, 3]);
        assert!(std::ptr::eq(bytes.as_ptr(), frame.payload[8..].as_ptr()));
    }
}
