//! topics.toml as `edgebus check-config` reads it: any text gets a config or an error that
//! names the file, and never a panic.
#![no_main]

use edgebus_services::config::TopicsFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = TopicsFile::parse(text, std::path::Path::new("topics.toml")) {
        assert!(e.to_string().contains("topics.toml"), "{e}");
    }
});
