//! `file-logger`: appends one JSON line per request to a file, in batches
//! written by a background task (see [`crate::logger`]). The file is
//! opened for each batch, so a rotated file is followed at once.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use turnpike_plugin::{typed, Env, Factory, FieldError, Plugin};

use crate::logger::{self, LogConfig, Logger, Sink};

pub(crate) const NAME: &str = "file-logger";
pub(crate) const PRIORITY: i32 = 399;

fn schema() -> Value {
    let mut props = logger::properties();
    props.insert("path".into(), json!({"type": "string", "minLength": 1}));
    // Lines reach the file within a second rather than APISIX's batches'
    // five: APISIX's file-logger writes at once.
    props.insert(
        "inactive_timeout".into(),
        json!({"type": "integer", "minimum": 1, "default": 1}),
    );
    json!({
        "type": "object",
        "properties": props,
        "required": ["path"],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    path: PathBuf,
    #[serde(flatten)]
    log: LogConfig,
}

struct File(PathBuf);

impl Sink for File {
    fn send<'a>(
        &'a self,
        batch: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let mut text = batch.join("\n");
            text.push('\n');
            let mut file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.0)
                .await
                .map_err(|e| format!("{}: {e}", self.0.display()))?;
            file.write_all(text.as_bytes())
                .await
                .map_err(|e| format!("{}: {e}", self.0.display()))?;
            file.flush().await.map_err(|e| e.to_string())
        })
    }
}

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config.clone())?;
    if c.path.is_dir() {
        return Err(FieldError::new("path", "is a directory"));
    }
    Logger::build(NAME, env, &config, &c.log, || File(c.path.clone()))
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}
