//! `WWW-Authenticate` challenges from upstream registries, and the token
//! endpoint URL a Bearer challenge points to.
//!
//! Owns: the RFC 9110 §11 challenge grammar (auth-params, quoted strings
//! with escapes, several challenges in one field) reduced to the two schemes
//! registries use, Bearer (the Docker token protocol) and Basic.
//!
//! Does not own: fetching or caching tokens, choosing credentials, or
//! deciding whether to trust a realm on another host; `upstream::auth`
//! does those with the values returned here. Nor joining several
//! `WWW-Authenticate` fields: the caller parses each one (or joins them with
//! `", "`, which the grammar allows) and concatenates the results.

/// A challenge berth knows how to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// Docker token protocol: GET `realm?service=..&scope=..` for a token.
    Bearer {
        realm: String,
        service: Option<String>,
        /// What the upstream wants, e.g. `repository:library/nginx:pull`.
        scope: Option<String>,
    },
    Basic {
        realm: Option<String>,
    },
}

/// Parses every challenge in a `WWW-Authenticate` value, in order.
///
/// Lenient where registries are sloppy and strict where guessing would be
/// wrong: scheme and parameter names are case-insensitive, whitespace around
/// `=` is accepted (BWS), empty list elements are skipped, and a parameter
/// value may be a bare run of non-space characters (a URL, say) as well as a
/// token or quoted string. Unknown schemes, token68 credentials, a Bearer
/// without a non-empty realm, and any parameter that cannot be read
/// (unterminated quote, control character, junk after the value) are
/// dropped; the first occurrence of a repeated parameter wins.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut challenges = Vec::new();
    let mut current: Option<RawChallenge<'_>> = None;
    let mut c = Cursor { s: header, pos: 0 };
    loop {
        c.skip_separators();
        if c.at_end() {
            break;
        }
        let word = c.token();
        if word.is_empty() {
            c.skip_element();
            continue;
        }
        c.skip_ws();
        if c.peek() == Some(b'=') {
            c.pos += 1;
            c.skip_ws();
            match c.param_value() {
                Some(value) if c.at_element_end() => {
                    // A parameter before any scheme belongs to nothing.
                    if let Some(ch) = current.as_mut() {
                        ch.params.push((word, value));
                    }
                }
                _ => c.skip_element(),
            }
        } else {
            challenges.extend(current.take().and_then(RawChallenge::into_challenge));
            current = Some(RawChallenge {
                scheme: word,
                params: Vec::new(),
            });
            // `Negotiate abc==` style credentials carry no params we want.
            c.skip_token68();
        }
    }
    challenges.extend(current.and_then(RawChallenge::into_challenge));
    challenges
}

/// A scheme and its parameters before we know whether we care about it.
struct RawChallenge<'a> {
    scheme: &'a str,
    params: Vec<(&'a str, String)>,
}

impl RawChallenge<'_> {
    fn param(&self, name: &str) -> Option<String> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    fn into_challenge(self) -> Option<Challenge> {
        if self.scheme.eq_ignore_ascii_case("bearer") {
            // Without a realm there is nowhere to ask for a token.
            let realm = self.param("realm").filter(|r| !r.is_empty())?;
            Some(Challenge::Bearer {
                realm,
                service: self.param("service"),
                scope: self.param("scope"),
            })
        } else if self.scheme.eq_ignore_ascii_case("basic") {
            Some(Challenge::Basic {
                realm: self.param("realm"),
            })
        } else {
            None
        }
    }
}

/// A position in the header; it only ever stops on ASCII bytes, so slicing
/// at `pos` is always on a char boundary.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn skip_while(&mut self, f: impl Fn(u8) -> bool) {
        while self.peek().is_some_and(&f) {
            self.pos += 1;
        }
    }

    fn skip_ws(&mut self) {
        self.skip_while(|b| b == b' ' || b == b'\t');
    }

    /// Whitespace and commas between list elements, including empty ones.
    fn skip_separators(&mut self) {
        self.skip_while(|b| matches!(b, b' ' | b'\t' | b','));
    }

    fn token(&mut self) -> &'a str {
        let start = self.pos;
        self.skip_while(is_tchar);
        &self.s[start..self.pos]
    }

    /// After a value: only whitespace may come before the next `,`.
    fn at_element_end(&mut self) -> bool {
        self.skip_ws();
        matches!(self.peek(), None | Some(b','))
    }

    /// Skips to the next comma outside a quoted string, to recover from a
    /// malformed element without misreading its insides as parameters.
    fn skip_element(&mut self) {
        let bytes = self.s.as_bytes();
        let mut in_quotes = false;
        while let Some(&b) = bytes.get(self.pos) {
            match b {
                b',' if !in_quotes => return,
                b'"' => in_quotes = !in_quotes,
                b'\\' if in_quotes => self.pos += 1,
                _ => {}
            }
            self.pos += 1;
        }
        self.pos = self.s.len();
    }

    /// Skips `token68` (RFC 9110 §11.2) if that is all the element holds;
    /// `realm=...` also starts like a token68, but continues after its `=`.
    fn skip_token68(&mut self) {
        let start = self.pos;
        self.skip_while(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
        if self.pos == start {
            return;
        }
        self.skip_while(|b| b == b'=');
        if !self.at_element_end() {
            self.pos = start;
        }
    }

    /// A quoted string (unescaped) or a bare value; `None` if malformed.
    fn param_value(&mut self) -> Option<String> {
        if self.peek() == Some(b'"') {
            return self.quoted_string();
        }
        let start = self.pos;
        self.skip_while(|b| !matches!(b, b' ' | b'\t' | b',' | b'"') && !b.is_ascii_control());
        (self.pos > start).then(|| self.s[start..self.pos].to_owned())
    }

    /// `"` *( qdtext / quoted-pair ) `"`, with the cursor on the opening
    /// quote. Control characters other than HTAB are refused: they are not
    /// qdtext, and a realm holding one must never reach a request line.
    fn quoted_string(&mut self) -> Option<String> {
        let mut out = String::new();
        let mut chars = self.s[self.pos + 1..].char_indices();
        while let Some((i, ch)) = chars.next() {
            let ch = match ch {
                '"' => {
                    self.pos += 1 + i + 1;
                    return Some(out);
                }
                '\\' => chars.next()?.1,
                ch => ch,
            };
            if ch.is_control() && ch != '\t' {
                return None;
            }
            out.push(ch);
        }
        None
    }
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The token request URL for a Bearer challenge: `realm` plus `service` and
/// one `scope` parameter per scope, as the Docker token protocol expects.
///
/// Values are percent-encoded (everything but RFC 3986 unreserved
/// characters, like Go's `url.Values` that registries are written against).
/// A realm that already has a query gets `&`-joined parameters; a fragment
/// is dropped since it would otherwise swallow the query. Empty service and
/// scope values are left out rather than sent as `service=`.
pub fn token_url(realm: &str, service: Option<&str>, scopes: &[String]) -> String {
    let base = realm.split_once('#').map_or(realm, |(before, _)| before);
    let mut url = base.to_owned();
    let mut separator = match base.find('?') {
        None => Some('?'),
        Some(_) if base.ends_with(['?', '&']) => None,
        Some(_) => Some('&'),
    };
    let params = service
        .map(|s| ("service", s))
        .into_iter()
        .chain(scopes.iter().map(|s| ("scope", s.as_str())))
        .filter(|(_, v)| !v.is_empty());
    for (key, value) in params {
        url.extend(separator);
        separator = Some('&');
        url.push_str(key);
        url.push('=');
        percent_encode_into(value, &mut url);
    }
    url
}

fn percent_encode_into(value: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bearer(realm: &str, service: Option<&str>, scope: Option<&str>) -> Challenge {
        Challenge::Bearer {
            realm: realm.into(),
            service: service.map(Into::into),
            scope: scope.map(Into::into),
        }
    }

    fn basic(realm: Option<&str>) -> Challenge {
        Challenge::Basic {
            realm: realm.map(Into::into),
        }
    }

    #[test]
    fn parses_registry_challenges() {
        let hub = bearer(
            "https://auth.docker.io/token",
            Some("registry.docker.io"),
            Some("repository:library/nginx:pull"),
        );
        let cases: Vec<(&str, Vec<Challenge>)> = vec![
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
                vec![hub.clone()],
            ),
            // Case-insensitive names, spaces after commas and around `=`.
            (
                r#"bEaReR REALM = "https://auth.docker.io/token" , Service="registry.docker.io",  SCOPE="repository:library/nginx:pull""#,
                vec![hub.clone()],
            ),
            // Commas and escapes inside quotes.
            (
                r#"Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:a/b:pull,push""#,
                vec![bearer(
                    "https://ghcr.io/token",
                    Some("ghcr.io"),
                    Some("repository:a/b:pull,push"),
                )],
            ),
            (
                r#"Bearer realm="https://x/t\"o\\k",scope="a\,b""#,
                vec![bearer(r#"https://x/t"o\k"#, None, Some("a,b"))],
            ),
            // Bare (unquoted) values, including a URL.
            (
                "Bearer realm=https://x/token?a=b,service=reg",
                vec![bearer("https://x/token?a=b", Some("reg"), None)],
            ),
            // Several challenges, unknown schemes and token68 skipped.
            (
                r#"Basic realm="Registry Realm", Bearer realm="https://r/t",service="s""#,
                vec![
                    basic(Some("Registry Realm")),
                    bearer("https://r/t", Some("s"), None),
                ],
            ),
            (
                r#"Negotiate abc+/de==, Newauth realm="apps", type=1, title="Login to \"apps\"", Bearer realm="https://r/t""#,
                vec![bearer("https://r/t", None, None)],
            ),
            (r#"Negotiate, Basic"#, vec![basic(None)]),
            (r#"Basic realm="a",charset="UTF-8""#, vec![basic(Some("a"))]),
            ("basic", vec![basic(None)]),
            // Empty list elements and stray whitespace.
            (
                r#" , ,Bearer realm="r",,  ,scope="s" ,"#,
                vec![bearer("r", None, Some("s"))],
            ),
            ("Bearer\trealm=\"r\"", vec![bearer("r", None, None)]),
            // First of a repeated parameter wins.
            (
                r#"Bearer realm="r1",realm="r2""#,
                vec![bearer("r1", None, None)],
            ),
            // Bearer needs a realm.
            (r#"Bearer service="s",scope="x""#, vec![]),
            (r#"Bearer realm="""#, vec![]),
            ("Bearer", vec![]),
            (r#"Bearer error="invalid_token", Basic"#, vec![basic(None)]),
            // Malformed parameters are dropped, the rest survives.
            (
                r#"Bearer realm="r",service="unterminated"#,
                vec![bearer("r", None, None)],
            ),
            (
                r#"Bearer realm="r",scope="a"junk,service="s""#,
                vec![bearer("r", Some("s"), None)],
            ),
            (
                r#"Bearer realm="r", =x, "quoted", service="s""#,
                vec![bearer("r", Some("s"), None)],
            ),
            (
                "Bearer realm=\"r\",service=\"a\nb\"",
                vec![bearer("r", None, None)],
            ),
            (
                "Bearer realm=\"r\",service=\"a\u{0}b\"",
                vec![bearer("r", None, None)],
            ),
            (
                r#"Bearer realm="r",service="#,
                vec![bearer("r", None, None)],
            ),
            (
                r#"realm="orphan", Bearer realm="r""#,
                vec![bearer("r", None, None)],
            ),
            (
                r#"Bearer realm="r",service="ünï""#,
                vec![bearer("r", Some("ünï"), None)],
            ),
            ("", vec![]),
            ("   ", vec![]),
            (",", vec![]),
            ("\"", vec![]),
        ];
        for (header, want) in cases {
            assert_eq!(parse_challenges(header), want, "{header:?}");
        }
    }

    #[test]
    fn builds_token_urls() {
        let scopes = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cases: &[(&str, Option<&str>, Vec<String>, &str)] = &[
            (
                "https://auth.docker.io/token",
                Some("registry.docker.io"),
                scopes(&["repository:library/nginx:pull"]),
                "https://auth.docker.io/token?service=registry.docker.io&scope=repository%3Alibrary%2Fnginx%3Apull",
            ),
            ("https://r/t", None, vec![], "https://r/t"),
            ("https://r/t", Some(""), scopes(&["", "a"]), "https://r/t?scope=a"),
            (
                "https://r/t",
                None,
                scopes(&["repository:a:pull,push", "registry:catalog:*"]),
                "https://r/t?scope=repository%3Aa%3Apull%2Cpush&scope=registry%3Acatalog%3A%2A",
            ),
            ("https://r/t?x=1", Some("s"), vec![], "https://r/t?x=1&service=s"),
            ("https://r/t?", Some("s"), vec![], "https://r/t?service=s"),
            ("https://r/t?x=1&", Some("s"), vec![], "https://r/t?x=1&service=s"),
            ("https://r/t#frag", Some("s"), vec![], "https://r/t?service=s"),
            ("https://r/t", Some("a b&c=d+é"), vec![], "https://r/t?service=a%20b%26c%3Dd%2B%C3%A9"),
            ("https://r/t", Some("Az09-._~"), vec![], "https://r/t?service=Az09-._~"),
        ];
        for (realm, service, scopes, want) in cases {
            assert_eq!(
                token_url(realm, *service, scopes),
                *want,
                "{realm:?} {service:?} {scopes:?}"
            );
        }
    }

    fn quote(s: &str) -> String {
        let mut out = String::from('"');
        for ch in s.chars() {
            if ch == '"' || ch == '\\' {
                out.push('\\');
            }
            out.push(ch);
        }
        out.push('"');
        out
    }

    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    /// Printable text with the characters that stress quoting.
    const VALUE: &str = "[ -~é,\"\\\\=]{0,40}";

    proptest! {
        #[test]
        fn never_panics(header in "\\PC*") {
            let _ = parse_challenges(&header);
        }

        #[test]
        fn never_panics_on_challenge_like_input(
            header in "(Bearer|Basic| |,|=|\"|\\\\|realm|scope|a|é|\t){0,24}"
        ) {
            let _ = parse_challenges(&header);
        }

        #[test]
        fn quoted_values_round_trip(
            realm in "[ -~é]{1,40}",
            service in VALUE,
            scope in VALUE,
            upper in any::<bool>(),
            extra in prop_oneof![Just(""), Just("Negotiate abc==, "), Just("Newauth x=\"y,z\", ")],
        ) {
            let name = |n: &str| if upper { n.to_uppercase() } else { n.to_owned() };
            let header = format!(
                "{extra}{} {}={}, {}={} ,{}={}, Basic realm={}",
                name("bearer"), name("realm"), quote(&realm), name("service"), quote(&service),
                name("scope"), quote(&scope), quote(&scope),
            );
            prop_assert_eq!(
                parse_challenges(&header),
                vec![
                    bearer(&realm, Some(&service), Some(&scope)),
                    basic(Some(&scope)),
                ]
            );
        }

        #[test]
        fn token_url_query_decodes_to_its_inputs(
            service in "\\PC{0,20}",
            scopes in proptest::collection::vec("\\PC{0,20}", 0..4),
        ) {
            let url = token_url("https://r/t", Some(&service), &scopes);
            let want: Vec<(String, String)> = std::iter::once(("service".to_owned(), service))
                .chain(scopes.into_iter().map(|s| ("scope".to_owned(), s)))
                .filter(|(_, v)| !v.is_empty())
                .collect();
            let got: Vec<(String, String)> = match url.split_once('?') {
                None => vec![],
                Some((_, query)) => query
                    .split('&')
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap();
                        (k.to_owned(), percent_decode(v))
                    })
                    .collect(),
            };
            prop_assert_eq!(got, want);
        }
    }
}
