//! Who may act on the dashboard: `FORKQ_DASHBOARD_TOKEN` signs a session cookie and a CSRF
//! token, and every action checks both (or a bearer token, for scripts).
//!
//! Both values are HMAC-SHA256 of a fixed label under the token, so no state is kept and a
//! restart with the same token keeps people logged in; changing the token logs everyone out. The
//! cookie is HttpOnly and SameSite=Strict, the form field proves the page came from this
//! dashboard, and a cross-site Origin or Sec-Fetch-Site is refused: three locks on one door.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The session cookie's name.
pub const COOKIE: &str = "forkq_session";
/// The CSRF form field's name.
pub const CSRF_FIELD: &str = "csrf";

const SESSION_LABEL: &[u8] = b"forkq dashboard session";
const CSRF_LABEL: &[u8] = b"forkq dashboard csrf";
const LOGIN_LABEL: &[u8] = b"forkq dashboard login";

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8], label: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(label);
    mac
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether `given` (hex) is the MAC of `label` under `key`, compared in constant time.
fn verify(key: &[u8], label: &[u8], given: &str) -> bool {
    unhex(given).is_some_and(|bytes| mac(key, label).verify_slice(&bytes).is_ok())
}

/// What a request may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It may act; says how it proved it (for the log).
    Allowed(&'static str),
    /// No token is configured: the dashboard is read-only.
    ReadOnly,
    /// It may not; says why.
    Forbidden(String),
}

/// The request facts an action is judged on.
#[derive(Debug, Default)]
pub struct Credentials<'a> {
    /// The Cookie header.
    pub cookie: Option<&'a str>,
    /// The Authorization header.
    pub authorization: Option<&'a str>,
    /// The form's CSRF field.
    pub csrf: Option<&'a str>,
    /// The Origin header.
    pub origin: Option<&'a str>,
    /// The Sec-Fetch-Site header.
    pub fetch_site: Option<&'a str>,
    /// The Host header.
    pub host: Option<&'a str>,
}

/// The dashboard's token, if it has one.
#[derive(Clone)]
pub struct Auth {
    token: Option<String>,
}

impl Auth {
    /// Actions allowed with `token`; read-only without.
    pub fn new(token: Option<String>) -> Auth {
        Auth { token }
    }

    /// Whether actions are possible at all.
    pub fn enabled(&self) -> bool {
        self.token.is_some()
    }

    fn key(&self) -> Option<&[u8]> {
        self.token.as_deref().map(str::as_bytes)
    }

    /// The session cookie's value.
    pub fn session(&self) -> Option<String> {
        self.key()
            .map(|k| hex(&mac(k, SESSION_LABEL).finalize().into_bytes()))
    }

    /// The CSRF field every action form carries.
    pub fn csrf(&self) -> Option<String> {
        self.key()
            .map(|k| hex(&mac(k, CSRF_LABEL).finalize().into_bytes()))
    }

    /// Whether `given` is the token (compared in constant time).
    pub fn is_token(&self, given: &str) -> bool {
        self.key().is_some_and(|k| {
            let theirs = mac(given.as_bytes(), LOGIN_LABEL).finalize().into_bytes();
            verify(k, LOGIN_LABEL, &hex(&theirs))
        })
    }

    /// Whether the Cookie header carries a valid session.
    pub fn logged_in(&self, cookie: Option<&str>) -> bool {
        let Some(key) = self.key() else { return false };
        cookie
            .unwrap_or("")
            .split(';')
            .filter_map(|c| c.trim().split_once('='))
            .any(|(name, value)| name == COOKIE && verify(key, SESSION_LABEL, value))
    }

    /// Judges an action request.
    pub fn authorize(&self, c: &Credentials<'_>) -> Verdict {
        let Some(key) = self.key() else {
            return Verdict::ReadOnly;
        };
        if let Some(auth) = c.authorization {
            return match auth.strip_prefix("Bearer ") {
                Some(given) if self.is_token(given.trim()) => Verdict::Allowed("bearer token"),
                _ => Verdict::Forbidden("the Authorization header does not carry the token".into()),
            };
        }
        if c.fetch_site == Some("cross-site") {
            return Verdict::Forbidden("a cross-site request (Sec-Fetch-Site)".into());
        }
        if let (Some(origin), Some(host)) = (c.origin, c.host) {
            let same = origin
                .split_once("://")
                .is_some_and(|(_, rest)| rest == host);
            if !same {
                return Verdict::Forbidden(format!("a request from another origin ({origin})"));
            }
        }
        if !self.logged_in(c.cookie) {
            return Verdict::Forbidden("not logged in: log in with the dashboard token".into());
        }
        match c.csrf {
            Some(given) if verify(key, CSRF_LABEL, given) => Verdict::Allowed("session"),
            _ => Verdict::Forbidden("the form's CSRF token is missing or wrong".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef-secret";

    fn browser<'a>(auth: &'a Auth, session: &'a str, csrf: &'a str) -> Credentials<'a> {
        let _ = auth;
        Credentials {
            cookie: Some(session),
            csrf: Some(csrf),
            origin: Some("http://127.0.0.1:9281"),
            host: Some("127.0.0.1:9281"),
            fetch_site: Some("same-origin"),
            ..Default::default()
        }
    }

    #[test]
    fn a_session_with_its_csrf_token_may_act_and_nothing_else_may() {
        let auth = Auth::new(Some(TOKEN.into()));
        let cookie = format!("other=1; {COOKIE}={}", auth.session().unwrap());
        let csrf = auth.csrf().unwrap();
        assert_eq!(
            auth.authorize(&browser(&auth, &cookie, &csrf)),
            Verdict::Allowed("session")
        );
        for (what, c) in [
            (
                "no csrf",
                Credentials {
                    csrf: None,
                    ..browser(&auth, &cookie, &csrf)
                },
            ),
            ("forged csrf", browser(&auth, &cookie, "00ff")),
            (
                "no cookie",
                Credentials {
                    cookie: None,
                    ..browser(&auth, &cookie, &csrf)
                },
            ),
            ("forged cookie", browser(&auth, "forkq_session=abcd", &csrf)),
            (
                "other origin",
                Credentials {
                    origin: Some("https://evil.example"),
                    ..browser(&auth, &cookie, &csrf)
                },
            ),
            (
                "cross-site",
                Credentials {
                    fetch_site: Some("cross-site"),
                    ..browser(&auth, &cookie, &csrf)
                },
            ),
            (
                "wrong bearer",
                Credentials {
                    authorization: Some("Bearer nope"),
                    ..Default::default()
                },
            ),
        ] {
            assert!(
                matches!(auth.authorize(&c), Verdict::Forbidden(_)),
                "{what} was allowed"
            );
        }
        let bearer = format!("Bearer {TOKEN}");
        assert_eq!(
            auth.authorize(&Credentials {
                authorization: Some(&bearer),
                ..Default::default()
            }),
            Verdict::Allowed("bearer token")
        );
        assert!(auth.is_token(TOKEN) && !auth.is_token("0123456789abcdef-secreT"));
    }

    #[test]
    fn without_a_token_the_dashboard_is_read_only() {
        let auth = Auth::new(None);
        assert_eq!(auth.authorize(&Credentials::default()), Verdict::ReadOnly);
        assert!(!auth.logged_in(Some("forkq_session=00")) && !auth.is_token(""));
        assert_eq!(auth.session(), None);
    }
}
