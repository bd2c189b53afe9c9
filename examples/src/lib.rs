//! Runnable programs showing `bus` in use: see the files beside this crate. This library holds
//! what they share: writing their services' AsyncAPI documents (`--asyncapi <dir>`).

use std::error::Error;
use std::path::{Path, PathBuf};

use bus::Service;

/// The directory given with `--asyncapi <dir>` on the command line, if any: the example then
/// writes its services' AsyncAPI documents there instead of running.
///
/// # Errors
/// When `--asyncapi` is the last argument (no directory after it).
pub fn asyncapi_dir() -> Result<Option<PathBuf>, Box<dyn Error + Send + Sync>> {
    Ok(argument("--asyncapi")?.map(PathBuf::from))
}

/// The value of `--flag <value>` on the command line, if any.
fn argument(flag: &str) -> Result<Option<String>, Box<dyn Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == flag {
            return Ok(Some(args.next().ok_or(format!("{flag} needs a value"))?));
        }
    }
    Ok(None)
}

/// Writes `service`'s AsyncAPI document to `<dir>/<program>.<service>.json`, with the bus at
/// `url` as its server (nothing for `memory://`; never the URL's credentials), or the URL
/// given with `--server <url>`: the document of the service deployed on that broker, written
/// without connecting to it.
///
/// # Errors
/// When `url` is not a bus URL, or the file cannot be written.
pub fn write_asyncapi(
    dir: &Path,
    program: &str,
    service: &Service,
    url: &str,
) -> Result<PathBuf, Box<dyn Error + Send + Sync>> {
    let url = argument("--server")?.unwrap_or_else(|| url.to_owned());
    let document = service
        .asyncapi()
        .with_version(env!("CARGO_PKG_VERSION"))
        .with_server("bus", &url)?
        .to_json();
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{program}.{}.json", service.name()));
    std::fs::write(&path, serde_json::to_string_pretty(&document)? + "\n")?;
    println!("wrote {}", path.display());
    Ok(path)
}
