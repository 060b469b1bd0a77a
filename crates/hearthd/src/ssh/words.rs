//! The command string of an SSH `exec` request, split into words as a POSIX shell splits a
//! simple command: blanks separate words; single quotes keep everything up to the next single
//! quote; double quotes keep everything but `\` before `$`, `` ` ``, `"`, `\` or a newline;
//! an unquoted `\` keeps the next character (and a `\` before a newline joins lines); an
//! unquoted `#` that starts a word begins a comment. Nothing is expanded (`$HOME`, `~` and
//! `*` stay as they are). No shell runs the words, so an unquoted operator (`|`, `&`, `;`,
//! `<`, `>`, `(`, `)`, `` ` ``) is refused rather than passed on with another meaning.

/// Why a command string cannot be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WordsError {
    #[error("the command has an unterminated {quote} quote (opened at character {at})")]
    Unterminated { quote: &'static str, at: usize },
    #[error("the command ends with a backslash that escapes nothing")]
    TrailingBackslash,
    #[error(
        "the command has an unquoted `{operator}` at character {at}: the command account runs \
         no shell, so pipes, lists and redirections happen on your side (quote it, '{operator}', \
         to pass it as a word)"
    )]
    Operator { operator: char, at: usize },
    #[error("the command is not UTF-8 text")]
    NotText,
}

const OPERATORS: &[char] = &['|', '&', ';', '<', '>', '(', ')', '`'];

/// Splits `command` into words.
pub fn split(command: &str) -> Result<Vec<String>, WordsError> {
    let mut words = Vec::new();
    // The word being built; `None` between words (so `''` still makes an empty word).
    let mut word: Option<String> = None;
    let mut chars = command.chars().enumerate().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '#' if word.is_none() => {
                // A comment runs to the end of the line.
                for (_, c) in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some((_, '\'')) => break,
                        Some((_, c)) => w.push(c),
                        None => {
                            return Err(WordsError::Unterminated {
                                quote: "single",
                                at: at + 1,
                            });
                        }
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\n')) => {}
                            Some((_, c @ ('$' | '`' | '"' | '\\'))) => w.push(c),
                            Some((_, c)) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => {
                                return Err(WordsError::Unterminated {
                                    quote: "double",
                                    at: at + 1,
                                });
                            }
                        },
                        Some((_, c)) => w.push(c),
                        None => {
                            return Err(WordsError::Unterminated {
                                quote: "double",
                                at: at + 1,
                            });
                        }
                    }
                }
            }
            '\\' => match chars.next() {
                // A line continuation: nothing.
                Some((_, '\n')) => {}
                Some((_, c)) => word.get_or_insert_with(String::new).push(c),
                None => return Err(WordsError::TrailingBackslash),
            },
            c if OPERATORS.contains(&c) => {
                return Err(WordsError::Operator {
                    operator: c,
                    at: at + 1,
                });
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = word {
        words.push(w);
    }
    Ok(words)
}

/// [`split`] of the bytes an exec request carries.
pub fn split_bytes(command: &[u8]) -> Result<Vec<String>, WordsError> {
    split(std::str::from_utf8(command).map_err(|_| WordsError::NotText)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        split(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn blanks_separate_words() {
        assert_eq!(words("list"), ["list"]);
        assert_eq!(words("  inspect \t web\n"), ["inspect", "web"]);
        assert!(words("").is_empty());
        assert!(words(" \t\n ").is_empty());
    }

    #[test]
    fn single_quotes_keep_everything() {
        assert_eq!(
            words("exec vm -- sh -c 'exit 7'"),
            ["exec", "vm", "--", "sh", "-c", "exit 7"]
        );
        assert_eq!(words(r#"'a\b \"c\"'"#), [r#"a\b \"c\""#]);
        assert_eq!(words("'$HOME' '*'"), ["$HOME", "*"]);
        assert_eq!(words("''"), [""]);
        assert_eq!(words("a'' b"), ["a", "b"]);
        assert_eq!(words("'a'b'c'"), ["abc"]);
        assert_eq!(words("'|;&'"), ["|;&"]);
    }

    #[test]
    fn double_quotes_keep_all_but_four_escapes() {
        assert_eq!(words(r#""a b""#), ["a b"]);
        assert_eq!(words(r#""\$x \` \" \\""#), [r#"$x ` " \"#]);
        // Any other backslash stays, as in a shell.
        assert_eq!(words(r#""\n\a""#), [r"\n\a"]);
        assert_eq!(words("\"a\\\nb\""), ["ab"]);
        assert_eq!(words(r#""""#), [""]);
        assert_eq!(words(r#""it's""#), ["it's"]);
        assert_eq!(words(r#"x"y z"'w'"#), ["xy zw"]);
    }

    #[test]
    fn backslash_escapes_one_character() {
        assert_eq!(words(r"a\ b"), ["a b"]);
        assert_eq!(words(r#"\'\"\\"#), [r#"'"\"#]);
        assert_eq!(words(r"\|"), ["|"]);
        assert_eq!(words("a\\\nb"), ["ab"]);
        assert_eq!(words(r"\#x"), ["#x"]);
    }

    #[test]
    fn nothing_is_expanded() {
        assert_eq!(
            words("exec vm -- echo $HOME ~ *.txt {a,b}"),
            ["exec", "vm", "--", "echo", "$HOME", "~", "*.txt", "{a,b}"]
        );
    }

    #[test]
    fn comments_start_words_only() {
        assert_eq!(words("list # all of them"), ["list"]);
        assert_eq!(words("a#b"), ["a#b"]);
        assert_eq!(words("a # x\nb"), ["a", "b"]);
        assert_eq!(words("#"), Vec::<String>::new());
    }

    #[test]
    fn bad_input_is_refused_with_where() {
        assert_eq!(
            split("exec vm -- sh -c 'exit 7"),
            Err(WordsError::Unterminated {
                quote: "single",
                at: 18
            })
        );
        assert_eq!(
            split("a \"b"),
            Err(WordsError::Unterminated {
                quote: "double",
                at: 3
            })
        );
        assert_eq!(
            split("a \"b\\"),
            Err(WordsError::Unterminated {
                quote: "double",
                at: 3
            })
        );
        assert_eq!(split("a\\"), Err(WordsError::TrailingBackslash));
        assert_eq!(
            split("list | grep x"),
            Err(WordsError::Operator {
                operator: '|',
                at: 6
            })
        );
        for op in ["a;b", "a&", "a>b", "<a", "(a)", "`a`"] {
            assert!(
                matches!(split(op), Err(WordsError::Operator { .. })),
                "{op}"
            );
        }
        let message = split("list; delete x").unwrap_err().to_string();
        assert!(message.contains("unquoted `;`"), "{message}");
        assert_eq!(split_bytes(b"\xff"), Err(WordsError::NotText));
    }

    #[test]
    fn words_survive_quoting_them_again() {
        // Any list of words, each quoted the shell way, splits back into itself.
        let samples: &[&[&str]] = &[
            &[
                "exec",
                "vm",
                "--",
                "sh",
                "-c",
                "echo 'a b' \"$X\" | tr a-z A-Z",
            ],
            &["", " ", "\\", "'", "\"", "\n", "#", "a#b", "$(x)", "*"],
        ];
        for sample in samples {
            let quoted: Vec<String> = sample
                .iter()
                .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
                .collect();
            assert_eq!(words(&quoted.join(" ")), *sample);
        }
    }
}
