//! `/turnpike/registry[/{service}[/{instance}]]`: services announce their
//! instances (PUT, which also renews), leave (DELETE), and anyone with a
//! key reads them (GET). Beyond APISIX; see docs/discovery.md.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use turnpike_store::{Registration, Registry, StoreError};

use crate::{Admin, Answer, Call};

pub(crate) async fn handle(admin: &Admin, call: &Call<'_>, rest: &str) -> Answer {
    let Some(registry) = &admin.registry else {
        return Answer::error(StatusCode::NOT_FOUND, "no service registry on this gateway");
    };
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    for p in &parts {
        if !crate::resources::valid_id(p) {
            return Answer::error(
                StatusCode::BAD_REQUEST,
                "service and instance names are 1 to 64 characters from a-z A-Z 0-9 - _ .",
            );
        }
    }
    match (call.method, parts.as_slice()) {
        (&Method::GET, []) => Answer::ok(json!({"services": registry.all()})),
        (&Method::GET, [service]) => {
            let instances = registry.instances(service);
            Answer::ok(json!({"service": service, "total": instances.len(), "instances": instances}))
        }
        (&Method::PUT, [service, instance]) => register(registry, call, service, instance).await,
        (&Method::DELETE, [service, instance]) => match registry.deregister(service, instance).await {
            Ok(true) => Answer::ok(json!({"deleted": instance, "service": service})),
            Ok(false) => Answer::error(StatusCode::NOT_FOUND, format!("no instance `{instance}` of `{service}`")),
            Err(e) => unavailable(e),
        },
        _ => Answer::error(StatusCode::METHOD_NOT_ALLOWED, "GET /turnpike/registry[/{service}], PUT or DELETE /turnpike/registry/{service}/{instance}"),
    }
}

async fn register(registry: &Registry, call: &Call<'_>, service: &str, instance: &str) -> Answer {
    let registration: Registration = match serde_json::from_slice(&call.body) {
        Ok(r) => r,
        Err(e) => {
            return Answer::error(
                StatusCode::BAD_REQUEST,
                format!("invalid registration: {e}"),
            )
        }
    };
    if let Some(why) = registration.problem() {
        return Answer::error(StatusCode::BAD_REQUEST, why);
    }
    match registry.register(service, instance, registration).await {
        Ok(i) => {
            let mut body = serde_json::to_value(&i).unwrap_or(Value::Null);
            body["service"] = service.into();
            Answer::ok(body)
        }
        Err(e) => unavailable(e),
    }
}

fn unavailable(e: StoreError) -> Answer {
    Answer::error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}
