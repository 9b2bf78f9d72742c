//! Hiding the secrets of a store URL wherever driftd shows one: `driftd
//! check`, connection errors, `/readyz`.
//!
//! A store URL carries a password in its userinfo (`postgres://u:pw@h/db`)
//! or in a query parameter (`?password=pw`, `?sslpassword=pw`; sqlx reads
//! the former, libpq both). [`mask_url`] replaces each with `***`; a URL
//! that does not parse is hidden whole, since where its secrets are cannot
//! be known. [`scrub`] removes those secrets from any other text, such as a
//! database error, in case the driver echoed them.

use reqwest::Url;

/// What a secret is replaced with.
const MASK: &str = "***";

/// Whether a query parameter holds a secret: any whose name contains
/// `password` (`password`, `sslpassword`, ...), in any case.
fn is_secret_param(name: &str) -> bool {
    name.to_ascii_lowercase().contains("password")
}

/// The URL with its password and password parameters replaced by `***`;
/// unchanged if it holds none.
pub fn mask_url(raw: &str) -> String {
    let Ok(mut url) = Url::parse(raw) else {
        return hidden(raw);
    };
    let mut changed = false;
    if url.password().is_some() {
        if url.set_password(Some(MASK)).is_err() {
            return hidden(raw);
        }
        changed = true;
    }
    if url.query_pairs().any(|(k, _)| is_secret_param(&k)) {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_param(&k) {
                    MASK.to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
        changed = true;
    }
    if changed {
        url.to_string()
    } else {
        raw.to_string()
    }
}

/// An unparseable URL: its scheme only.
fn hidden(raw: &str) -> String {
    let scheme = raw
        .split(':')
        .next()
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or("?");
    format!("{scheme}:{MASK} (unparseable URL hidden)")
}

/// `text` with the URL masked and every secret of `raw` (as written and
/// percent-decoded) replaced by `***`.
pub fn scrub(text: &str, raw: &str) -> String {
    let mut out = text.replace(raw, &mask_url(raw));
    let mut secrets = secrets(raw);
    // Longest first, so a secret containing another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for secret in secrets {
        out = out.replace(&secret, MASK);
    }
    out
}

/// The secrets of a store URL, as written and percent-decoded. An
/// unparseable URL yields none (its text is replaced whole by [`scrub`]).
fn secrets(raw: &str) -> Vec<String> {
    let Ok(url) = Url::parse(raw) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    if let Some(pw) = url.password() {
        found.push(pw.to_string());
        found.push(percent_decode(pw));
    }
    for pair in url.query().unwrap_or_default().split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if is_secret_param(&percent_decode(name)) {
            found.push(value.to_string());
            found.push(percent_decode(&value.replace('+', " ")));
        }
    }
    found.retain(|s| !s.is_empty());
    found.dedup();
    found
}

/// `%XX` escapes decoded; invalid UTF-8 replaced.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_userinfo_passwords() {
        assert_eq!(
            mask_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            mask_url("postgres://app:p%40ss@db/x"),
            "postgres://app:***@db/x"
        );
        assert_eq!(mask_url("sqlite://a.db"), "sqlite://a.db");
        assert_eq!(mask_url("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(mask_url("postgres://app@db/x"), "postgres://app@db/x");
    }

    #[test]
    fn masks_password_parameters_in_any_case() {
        let masked = mask_url(
            "postgres://u@h/db?sslmode=require&password=s3cret&SSLPassword=k3y&PASSWORD=x%2By",
        );
        assert_eq!(
            masked,
            "postgres://u@h/db?sslmode=require&password=***&SSLPassword=***&PASSWORD=***"
        );
        let masked = mask_url("postgres://u:a@h/db?password=b");
        assert_eq!(masked, "postgres://u:***@h/db?password=***");
    }

    #[test]
    fn an_unparseable_url_is_hidden_whole() {
        let masked = mask_url("postgres://u:s3cret@h:notaport/db");
        assert!(!masked.contains("s3cret"), "{masked}");
        assert!(masked.starts_with("postgres:"), "{masked}");
    }

    #[test]
    fn scrub_removes_secrets_as_written_and_decoded() {
        let url = "postgres://u:p%40ss@h/db?sslpassword=k%2By+z";
        let text = format!("connecting to {url}: auth failed for p@ss, key k+y z, raw k%2By+z");
        let clean = scrub(&text, url);
        for secret in ["p%40ss", "p@ss", "k+y z", "k%2By+z"] {
            assert!(!clean.contains(secret), "{secret}: {clean}");
        }
        assert!(
            clean.contains("postgres://u:***@h/db?sslpassword=***"),
            "{clean}"
        );
    }

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("a%20b%zz%4"), "a b%zz%4");
    }
}
