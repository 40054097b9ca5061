use edgebus_runtime::prelude::*;
use serde_json::{json, Value};

#[derive(serde::Deserialize)]
struct Hello {
    name: String,
}

async fn hello(req: Request<Hello>) -> Result<Value, ServiceError> {
    let name = &req.data.name;
    req.emit("greeted", &json!({ "name": name })).await?;
    Ok(json!({ "greeting": format!("hello, {name}") }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    edgebus_runtime::init_logging();
    edgebus_runtime::service!("greeter") // its name, and this crate's version
        .endpoint("hello", hello)
        .event(EventSpec::new("greeted"))
        .run() // serves until SIGINT or SIGTERM, then stops cleanly
        .await?;
    Ok(())
}
