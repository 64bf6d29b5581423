//! Bytes from a replication connection: framing, stream messages and pgoutput decoding must
//! answer every input with a message or an error, never a panic, a hang or a huge allocation
//! (libFuzzer's `-rss_limit_mb` catches the last).
#![no_main]

use bytes::{Bytes, BytesMut};
use ficus_cdc::pgoutput;
use ficus_cdc::wire::{parse_copy_data, split_frame, StreamMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a stream of protocol messages carrying pgoutput.
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = split_frame(&mut buf) {
        if frame.tag != b'd' {
            continue;
        }
        if let Ok(StreamMessage::XLogData { data, .. }) = parse_copy_data(frame.body) {
            let _ = pgoutput::decode(&data);
        }
    }
    // As one pgoutput message on its own.
    let _ = pgoutput::decode(&Bytes::copy_from_slice(data));
});
