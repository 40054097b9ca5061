//! The broker's whole connection path, in-process: the input is everything one client sends
//! (framing, the specification's checks, both codecs, ACLs, wills, the router). A panic, or
//! a connection still open a few seconds after its input ended, is a finding.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use edgebus_broker::{Broker, BrokerConfig, BrokerHandle};
use libfuzzer_sys::fuzz_target;

static BROKER: OnceLock<BrokerHandle> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let broker = BROKER.get_or_init(|| {
        let config = BrokerConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            connect_timeout: Duration::from_millis(200),
            ..BrokerConfig::default()
        };
        Broker::start(config, Some("edge/system/broker".into())).expect("broker")
    });
    assert!(
        broker.serve_bytes(data, Duration::from_secs(5)),
        "the connection did not finish within 5 s of its input's end"
    );
});
