//! Integration tests: the real `turnpike` binary against real upstream
//! servers, everything on 127.0.0.1 ephemeral ports.

mod harness;
mod services;

mod admin;
mod async_mode;
mod cluster;
mod openapi;
mod registry;

mod balancing;
mod health;
mod lifecycle;
mod limits;
mod observability;
mod plugins;
mod proxying;
mod reload;
mod routing;
mod streams;
mod traffic;
mod upstream_http;
