//! Building a service: its endpoints, events, contract and state, and starting it.

use super::*;

/// Builds a service: its endpoints, its events, and its contract.
pub struct ServiceBuilder {
    spec: ServiceSpec,
    declared: Option<ServiceSpec>,
    /// The whole contract, for the retry and circuit policies of the endpoints it calls.
    contract: Vec<ServiceSpec>,
    version: String,
    handlers: BTreeMap<String, Arc<dyn Handler>>,
    max_request: usize,
    heartbeat: Duration,
    checks: Checks,
    state: Option<SharedState>,
}

/// State shared by a service's handlers ([`ServiceBuilder::with_state`]).
pub(super) type SharedState = Arc<dyn std::any::Any + Send + Sync>;

/// A [`ServiceBuilder`] for `name`, with the version of the crate that calls the macro
/// (`CARGO_PKG_VERSION`): `edgebus_runtime::service!("greeter")`.
#[macro_export]
macro_rules! service {
    ($name:expr) => {
        $crate::service::ServiceBuilder::new($name).version(env!("CARGO_PKG_VERSION"))
    };
}

impl ServiceBuilder {
    /// A service called `name` (the second topic level).
    pub fn new(name: impl Into<String>) -> ServiceBuilder {
        ServiceBuilder {
            spec: ServiceSpec {
                name: name.into(),
                ..Default::default()
            },
            declared: None,
            contract: Vec::new(),
            version: "unknown".into(),
            handlers: BTreeMap::new(),
            max_request: 256 * 1024,
            heartbeat: Duration::from_secs(1),
            checks: Checks::default(),
            state: None,
        }
    }

    /// State every handler of the service shares, read with [`Request::state`]: a store, a
    /// client, a configuration. Given once here instead of cloned into each closure.
    pub fn with_state<S: Send + Sync + 'static>(mut self, state: S) -> Self {
        self.state = Some(Arc::new(state));
        self
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Whether [`ServiceBuilder::contract`] was given.
    pub(crate) fn has_contract(&self) -> bool {
        self.declared.is_some() || !self.contract.is_empty()
    }

    /// How often the instance publishes its heartbeat (default 1 s; zero: never).
    pub fn heartbeat_interval(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// Adds a health check, run before every heartbeat (bounded by half the interval). Any
    /// failed check makes the instance `unhealthy`, any degraded one `degraded`.
    pub fn health_check<F, Fut>(mut self, name: &str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Check> + Send + 'static,
    {
        self.checks.add(name, check);
        self
    }

    /// The version reported in the registry (`unknown` unless given; [`crate::service!`]
    /// gives the calling crate's).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// A one-line description.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.spec.description = text.into();
        self
    }

    /// Adds a capability word.
    pub fn capability(mut self, c: impl Into<String>) -> Self {
        self.spec.capabilities.push(c.into());
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, t: impl Into<String>) -> Self {
        self.spec.tags.push(t.into());
        self
    }

    /// Largest request payload handled; larger ones get `PAYLOAD_TOO_LARGE`.
    pub fn max_request(mut self, bytes: usize) -> Self {
        self.max_request = bytes;
        self
    }

    /// Binds the service to the `[[service]]` entries of topics.toml. When one declares this
    /// service, it is the contract: every endpoint and event the code registers must be
    /// declared there, and its settings (QoS, timeout, concurrency, schema) win.
    ///
    /// The other services' endpoints give this instance's requests to them their `retry`
    /// and `circuit` policies ([`Bus::apply_contract`]).
    pub fn contract(mut self, services: &[ServiceSpec]) -> Self {
        self.declared = services.iter().find(|s| s.name == self.spec.name).cloned();
        self.contract = services.to_vec();
        self
    }

    /// Adds an endpoint with default settings and a typed handler. A payload that does not
    /// decode into `T` gets `BAD_REQUEST` naming the field.
    pub fn endpoint<T, R, F, Fut>(self, name: &str, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
        F: Fn(Request<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, ServiceError>> + Send + 'static,
    {
        self.endpoint_with(EndpointSpec::new(name), handler)
    }

    /// Adds an endpoint with explicit settings.
    pub fn endpoint_with<T, R, F, Fut>(mut self, spec: EndpointSpec, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
        F: Fn(Request<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, ServiceError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased = move |req: Request<Value>| -> BoxFuture<Result<Value, ServiceError>> {
            let handler = handler.clone();
            Box::pin(async move {
                let out = handler(req.decode::<T>()?).await?;
                serde_json::to_value(out)
                    .map_err(|e| ServiceError::internal(format!("reply cannot be encoded: {e}")))
            })
        };
        self.handlers
            .insert(spec.name.clone(), Arc::new(FnHandler(erased)));
        self.spec.endpoints.retain(|e| e.name != spec.name);
        self.spec.endpoints.push(spec);
        self
    }

    /// Declares an event stream.
    pub fn event(mut self, spec: EventSpec) -> Self {
        self.spec.events.retain(|e| e.name != spec.name);
        self.spec.events.push(spec);
        self
    }

    /// The contract as it will run: the code's declarations checked against topics.toml's.
    pub fn resolve(&self) -> Result<ServiceSpec, StartError> {
        let err = |message: String| StartError::Contract {
            service: self.spec.name.clone(),
            message,
        };
        let Some(declared) = &self.declared else {
            return Ok(self.spec.clone());
        };
        let mut spec = declared.clone();
        for e in &self.spec.endpoints {
            if !declared.endpoints.iter().any(|d| d.name == e.name) {
                return Err(err(format!(
                    "endpoint `{}` is not declared in topics.toml (add a [[service.endpoint]] \
                     with name = \"{}\")",
                    e.name, e.name
                )));
            }
        }
        for d in &declared.endpoints {
            if !self.handlers.contains_key(&d.name) {
                return Err(err(format!(
                    "topics.toml declares endpoint `{}`, which this service does not serve",
                    d.name
                )));
            }
        }
        for e in &self.spec.events {
            if !declared.events.iter().any(|d| d.name == e.name) {
                return Err(err(format!(
                    "event `{}` is not declared in topics.toml (add a [[service.event]] with \
                     name = \"{}\")",
                    e.name, e.name
                )));
            }
        }
        if spec.description.is_empty() {
            spec.description = self.spec.description.clone();
        }
        if spec.capabilities.is_empty() {
            spec.capabilities = self.spec.capabilities.clone();
        }
        if spec.tags.is_empty() {
            spec.tags = self.spec.tags.clone();
        }
        Ok(spec)
    }

    /// Subscribes every endpoint (through the shared group named after the service, so that
    /// instances share the load) and starts serving.
    pub async fn start(self, bus: &Bus) -> Result<Service, StartError> {
        let spec = self.resolve()?;
        crate::contract::validate(std::slice::from_ref(&spec), bus.prefix()).map_err(|e| {
            StartError::Contract {
                service: spec.name.clone(),
                message: e.to_string(),
            }
        })?;
        bus.apply_contract(&self.contract);
        let stopping = CancellationToken::new();
        let presence = bus.options().presence.clone().and_then(|identity| {
            if identity.service != spec.name {
                tracing::warn!(
                    service = %spec.name,
                    bus_service = %identity.service,
                    "the bus was made for another service; this one does not register"
                );
                return None;
            }
            let birth = birth_record(
                &identity,
                &self.version,
                &spec,
                bus.prefix(),
                self.heartbeat,
            );
            Some(Arc::new(Presence::new(identity, bus.prefix(), birth)))
        });
        let inner = Arc::new(ServiceInner {
            presence: presence.clone(),
            name: spec.name.clone(),
            instance: bus.client_id().to_owned(),
            version: self.version.clone(),
            bus: bus.clone(),
            deadletter: edgebus_proto::tree::Tree::new(bus.prefix()).dead_letter(&spec.name),
            started: Instant::now(),
            state: self.state.clone(),
            stats: spec
                .endpoints
                .iter()
                .map(|e| (e.name.clone(), Arc::new(EndpointStats::default())))
                .collect(),
            spec,
        });
        let mut tasks = Vec::new();
        let mut serving = Vec::new();
        for e in &inner.spec.endpoints {
            let Some(handler) = self.handlers.get(&e.name).cloned() else {
                continue;
            };
            let base = e.base_topic(bus.prefix(), &inner.name);
            let ctx = Arc::new(EndpointCtx {
                service: inner.clone(),
                spec: e.clone(),
                request_topic: edgebus_proto::tree::request_under(&base),
                handler,
                stats: inner.stats[&e.name].clone(),
                max_request: self.max_request,
                limit: Arc::new(Semaphore::new(e.max_concurrency)),
                rate: e.rate_limit.map(|r| Mutex::new(TokenBucket::new(r))),
                dedupe: (e.dedupe_size > 0)
                    .then(|| Mutex::new(Dedupe::new(e.dedupe_size, e.dedupe_for))),
            });
            let overflow_ctx = ctx.clone();
            let overflow = Box::new(move |msg: Message| {
                overflow_ctx.stats.reject();
                let err = ErrorBody::unavailable(format!(
                    "endpoint saturated ({} in flight and the queue full); retry later",
                    overflow_ctx.spec.max_concurrency
                ));
                let service = &overflow_ctx.service;
                let address = ReplyAddress::of_request(&msg);
                let sent = address.reply(
                    &service.bus,
                    Some(&service.name),
                    &service.instance,
                    None,
                    Some(err),
                );
                if let Err(e) = sent {
                    tracing::warn!(
                        endpoint = %overflow_ctx.spec.name,
                        error = %e,
                        "endpoint saturated and the reply queue full; request refused without a reply"
                    );
                }
            });
            let sub = bus
                .subscribe_with(
                    &format!("$share/{}/{}", inner.name, ctx.request_topic),
                    &ctx.request_topic,
                    e.qos,
                    Some(overflow),
                )
                .await?;
            serving.push(tokio::spawn(serve(ctx, sub, stopping.clone())));
        }
        if let Some(p) = &presence {
            let weak = Arc::downgrade(&inner);
            let figures: Figures = Box::new(move || {
                let inner = weak.upgrade()?;
                let stats = EndpointSnapshot::total(inner.stats.values().map(|s| s.snapshot()));
                Some((inner.started.elapsed(), stats))
            });
            tasks.push(start_presence(p.clone(), figures, bus, self.heartbeat, self.checks).await?);
        }
        tracing::info!(
            service = %inner.name,
            instance = %inner.instance,
            endpoints = inner.spec.endpoints.len(),
            "service started"
        );
        Ok(Service {
            inner,
            serving: Arc::new(std::sync::Mutex::new(serving)),
            tasks: Arc::new(std::sync::Mutex::new(tasks)),
            stopping,
        })
    }
}
