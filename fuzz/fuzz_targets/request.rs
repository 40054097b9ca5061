//! A request payload, decoded as an endpoint does before its handler runs: the JSON, the
//! metadata fields, a schema check and the reply address. None of it may panic.
#![no_main]

use edgebus_proto::contract::Schema;
use edgebus_proto::topic::check_topic;
use edgebus_proto::wire::decode_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((value, meta)) = decode_request(data) else {
        return;
    };
    let schema: Schema = serde_json::from_str(
        r#"{"text": "string", "n": "integer?", "tags": "array?", "x": "number?", "o": "object?"}"#,
    )
    .expect("schema");
    let _ = schema.check(&value);
    if let Some(to) = meta.reply_to {
        let _ = check_topic(&to);
    }
});
