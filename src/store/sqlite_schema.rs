//! Reading a SQLite table's column types and collations the way SQLite
//! itself applies them: a declared type maps to an affinity by SQLite's
//! rules (so `VARCHAR(5)` is plain TEXT and `BOOLEAN` is NUMERIC), and a
//! column's collation comes from its `COLLATE` clause in the table's DDL.

use super::shape::Kind;

/// The kind of a column declared as `declared`, by SQLite's affinity rules
/// (section "Determination Of Column Affinity" of its documentation).
pub fn affinity(declared: &str) -> Kind {
    let t = declared.to_ascii_uppercase();
    if t.contains("INT") {
        Kind::Integer
    } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
        Kind::Text
    } else if t.contains("BLOB") || t.trim().is_empty() {
        Kind::Untyped
    } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
        Kind::Other
    } else {
        Kind::Numeric
    }
}

/// A token of SQL: a word or quoted identifier (unquoted), or punctuation.
#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Punct(char),
}

fn tokens(sql: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '"' | '`' | '[' | '\'' => {
                let close = if c == '[' { ']' } else { c };
                let mut word = String::new();
                while let Some(d) = chars.next() {
                    if d == close {
                        // a doubled quote is an escaped one
                        if close != ']' && chars.peek() == Some(&close) {
                            chars.next();
                            word.push(d);
                            continue;
                        }
                        break;
                    }
                    word.push(d);
                }
                out.push(Token::Word(word));
            }
            '-' if chars.peek() == Some(&'-') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
            }
            // A block comment, to its end or the end of the text (SQLite
            // accepts one left open).
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut star = false;
                for d in chars.by_ref() {
                    if star && d == '/' {
                        break;
                    }
                    star = d == '*';
                }
            }
            c if c.is_alphanumeric() || c == '_' => {
                let mut word = String::from(c);
                while let Some(&d) = chars.peek() {
                    if d.is_alphanumeric() || d == '_' || d == '$' {
                        word.push(d);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Token::Word(word));
            }
            c => out.push(Token::Punct(c)),
        }
    }
    out
}

/// The collation named in `column`'s definition in a `CREATE TABLE`
/// statement, upper-cased; `None` when it names none (BINARY).
pub fn column_collation(create_sql: &str, column: &str) -> Option<String> {
    let toks = tokens(create_sql);
    let open = toks.iter().position(|t| *t == Token::Punct('('))?;
    let mut depth = 0usize;
    let mut defs: Vec<Vec<&Token>> = vec![Vec::new()];
    for t in &toks[open + 1..] {
        match t {
            Token::Punct('(') => depth += 1,
            Token::Punct(')') if depth == 0 => break,
            Token::Punct(')') => depth -= 1,
            Token::Punct(',') if depth == 0 => {
                defs.push(Vec::new());
                continue;
            }
            _ => {}
        }
        if let Some(def) = defs.last_mut() {
            def.push(t);
        }
    }
    let def = defs.into_iter().find(
        |def| matches!(def.first(), Some(Token::Word(w)) if w.eq_ignore_ascii_case(column)),
    )?;
    def.windows(2).find_map(|pair| match pair {
        [Token::Word(kw), Token::Word(name)] if kw.eq_ignore_ascii_case("collate") => {
            Some(name.to_ascii_uppercase())
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_follows_sqlite_rules() {
        assert_eq!(affinity("INTEGER"), Kind::Integer);
        assert_eq!(affinity("BIGINT"), Kind::Integer);
        assert_eq!(affinity("VARCHAR(5)"), Kind::Text);
        assert_eq!(affinity("text"), Kind::Text);
        assert_eq!(affinity(""), Kind::Untyped);
        assert_eq!(affinity("BLOB"), Kind::Untyped);
        assert_eq!(affinity("DOUBLE PRECISION"), Kind::Other);
        assert_eq!(affinity("BOOLEAN"), Kind::Numeric);
        assert_eq!(affinity("DECIMAL(10,2)"), Kind::Numeric);
    }

    #[test]
    fn finds_a_column_collation() {
        let sql = r#"CREATE TABLE "users" (
            "uuid" TEXT COLLATE NOCASE PRIMARY KEY, -- a comment, with a comma
            name VARCHAR(10, 2) collate rtrim,
            [odd name] TEXT,
            note TEXT DEFAULT 'a, COLLATE x',
            CHECK (length(name) > 0)
        )"#;
        assert_eq!(column_collation(sql, "uuid").as_deref(), Some("NOCASE"));
        assert_eq!(column_collation(sql, "NAME").as_deref(), Some("RTRIM"));
        assert_eq!(column_collation(sql, "odd name"), None);
        assert_eq!(column_collation(sql, "note"), None);
        assert_eq!(column_collation(sql, "missing"), None);
        let hidden = "CREATE TABLE t (id TEXT COLLATE /* folded */ NOCASE, a /* x, y */ TEXT COLLATE RTRIM, b TEXT /* open";
        assert_eq!(column_collation(hidden, "id").as_deref(), Some("NOCASE"));
        assert_eq!(column_collation(hidden, "a").as_deref(), Some("RTRIM"));
        assert_eq!(column_collation(hidden, "b"), None);
    }
}
