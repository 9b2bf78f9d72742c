//! Decodes Wazo-shaped user pages with the mapping the pass benchmark
//! uses (`email` from `/emails/0/address`), once each, and prints rows
//! and nanoseconds a row. Wall time is noisy on a shared machine; count
//! instructions instead:
//!
//! ```sh
//! python3 ../shared/bench/wazo_users.py 5000 /tmp/wazo
//! cargo build --release --example decode_pages
//! valgrind --tool=callgrind --toggle-collect='*PageDecoder>::decode' \
//!     target/release/examples/decode_pages /tmp/wazo/www/0.1/users
//! ```
//!
//! (instructions decoding collected, divided by the rows printed).

use std::time::Instant;

use driftd::config::Settings;
use driftd::decode::{PageDecoder, RowDecoder};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MAPPING: &str = r#"
[resources.users]
key = { upstream = "/uuid", column = "uuid", type = "uuid" }
local = { table = "users" }
[resources.users.upstream]
base_url = "http://localhost"
list_path = "/0.1/users"
total_pointer = "/total"
key_order = "asc"
[resources.users.columns]
tenant_uuid = { from = "/tenant_uuid", type = "uuid" }
username = { from = "/username" }
firstname = { from = "/firstname" }
lastname = { from = "/lastname" }
email = { from = "/emails/0/address" }
enabled = { from = "/enabled", type = "boolean" }
"#;

fn main() -> Result<(), String> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: decode_pages DIR (the pages wazo_users.py wrote)")?;
    let settings = Settings::from_toml_str(MAPPING, "decode_pages").map_err(|e| e.to_string())?;
    let decoder = RowDecoder::new(&settings.resources["users"]);
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
        let path = entry.map_err(|e| format!("{dir}: {e}"))?.path();
        pages.push(std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    let started = Instant::now();
    let mut rows = 0;
    for page in &pages {
        rows += decoder.decode(page)?.items.len();
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "{} pages, {rows} rows, {:.0} ns a row",
        pages.len(),
        took * 1e9 / rows.max(1) as f64
    );
    Ok(())
}
