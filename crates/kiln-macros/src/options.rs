//! Parsing and checking the options of `#[task(...)]` and `#[flow(...)]`.

use proc_macro2::TokenStream;
use quote::{ToTokens, quote, quote_spanned};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, Lit, Meta, Token};

const KNOWN: &str = "name, retries, retry_delay, retry_if, timeout, tags, persist, storage, serializer, storage_key, cache, cache_key_fn, cache_expiration, refresh_cache, isolation, on_commit, on_rollback, cache_skip_unhashable, pool";

/// The options as checked, each kept as the tokens that build it.
#[derive(Default)]
pub(crate) struct Options {
    name: Option<syn::LitStr>,
    retries: Option<u32>,
    retry_delay: Option<TokenStream>,
    retry_if: Option<Expr>,
    timeout: Option<TokenStream>,
    tags: Option<Vec<syn::LitStr>>,
    persist: Option<bool>,
    storage: Option<syn::LitStr>,
    pool: Option<syn::LitStr>,
    serializer: Option<Expr>,
    storage_key: Option<syn::LitStr>,
    cache: Option<TokenStream>,
    cache_expr: Option<Expr>,
    cache_key_fn: Option<Expr>,
    cache_expiration: Option<TokenStream>,
    refresh_cache: Option<bool>,
    isolation: Option<TokenStream>,
    on_commit: Option<Expr>,
    on_rollback: Option<Expr>,
    cache_skip_unhashable: Option<bool>,
}

impl Options {
    pub(crate) fn parse(attr: TokenStream) -> syn::Result<Options> {
        let metas = syn::parse::Parser::parse2(Punctuated::<Meta, Token![,]>::parse_terminated, attr)?;
        let mut out = Options::default();
        let mut seen: Vec<String> = Vec::new();
        for meta in metas {
            let key = meta.path().get_ident().map(ToString::to_string).ok_or_else(|| {
                syn::Error::new(meta.path().span(), format!("unknown option; expected one of: {KNOWN}"))
            })?;
            if seen.contains(&key) {
                return Err(syn::Error::new(
                    meta.path().span(),
                    format!("option `{key}` is given twice"),
                ));
            }
            seen.push(key.clone());
            if let (Meta::Path(_), "persist") = (&meta, key.as_str()) {
                out.persist = Some(true);
                continue;
            }
            let value = match &meta {
                Meta::NameValue(nv) => &nv.value,
                _ if KNOWN.split(", ").any(|k| k == key) => {
                    return Err(syn::Error::new(
                        meta.span(),
                        format!("option `{key}` needs a value: `{key} = ...`"),
                    ));
                }
                _ => return Err(unknown(&meta, &key)),
            };
            match key.as_str() {
                "name" => {
                    let lit = string(value, "name", "`name = \"nightly-report\"`")?;
                    if lit.value().trim().is_empty() {
                        return Err(syn::Error::new(lit.span(), "`name` must not be empty"));
                    }
                    out.name = Some(lit);
                }
                "retries" => out.retries = Some(retries(value)?),
                "retry_delay" => out.retry_delay = Some(retry_delay(value)?),
                "retry_if" => match value {
                    Expr::Path(_) | Expr::Closure(_) => out.retry_if = Some(value.clone()),
                    _ => {
                        return Err(syn::Error::new(
                            value.span(),
                            "`retry_if` takes a function `fn(&E) -> bool`, like `retry_if = is_transient`",
                        ));
                    }
                },
                "timeout" => {
                    let d = duration(value, "timeout", false)?;
                    out.timeout = Some(quote_spanned!(value.span()=> ::std::time::Duration::from_nanos(#d)));
                }
                "tags" => out.tags = Some(tags(value)?),
                "persist" => match value {
                    Expr::Lit(syn::ExprLit { lit: Lit::Bool(b), .. }) => out.persist = Some(b.value),
                    _ => {
                        return Err(syn::Error::new(
                            value.span(),
                            "`persist` takes true or false (or stands alone)",
                        ));
                    }
                },
                "storage" => {
                    let lit = string(value, "storage", "`storage = \"my-results\"`")?;
                    let name = lit.value();
                    let ok =
                        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                    if !ok {
                        return Err(syn::Error::new(
                            lit.span(),
                            "a storage name uses letters, digits, '-' and '_'",
                        ));
                    }
                    out.storage = Some(lit);
                }
                "pool" => {
                    let lit = string(value, "pool", "`pool = \"gpu\"`")?;
                    if lit.value().trim().is_empty() {
                        return Err(syn::Error::new(lit.span(), "a pool needs a name"));
                    }
                    out.pool = Some(lit);
                }
                "serializer" => out.serializer = Some(value.clone()),
                "cache" => {
                    out.cache = Some(cache_policy(value)?);
                    out.cache_expr = Some(value.clone());
                }
                "cache_key_fn" => match value {
                    Expr::Path(_) => out.cache_key_fn = Some(value.clone()),
                    _ => {
                        return Err(syn::Error::new(
                            value.span(),
                            "`cache_key_fn` takes a function `fn(&kiln::CacheContext) -> Option<String>`",
                        ));
                    }
                },
                "cache_expiration" => {
                    let d = duration(value, "cache_expiration", false)?;
                    out.cache_expiration = Some(quote_spanned!(value.span()=> ::std::time::Duration::from_nanos(#d)));
                }
                "on_commit" | "on_rollback" => {
                    if !matches!(value, Expr::Path(_)) {
                        return Err(syn::Error::new(
                            value.span(),
                            format!("`{key}` takes a function `fn(&kiln::TransactionRun)`, like `{key} = undo_upload`"),
                        ));
                    }
                    if key == "on_commit" {
                        out.on_commit = Some(value.clone());
                    } else {
                        out.on_rollback = Some(value.clone());
                    }
                }
                "isolation" => {
                    let name = match value {
                        Expr::Path(p) => p.path.get_ident().map(ToString::to_string),
                        _ => None,
                    };
                    out.isolation = Some(match name.as_deref() {
                        Some("serializable") => quote!(::kiln::Isolation::Serializable),
                        Some("read_committed") => quote!(::kiln::Isolation::ReadCommitted),
                        _ => {
                            return Err(syn::Error::new(
                                value.span(),
                                "`isolation` is `serializable` (one run computes, the others wait) or `read_committed`",
                            ));
                        }
                    });
                }
                "cache_skip_unhashable" => match value {
                    Expr::Lit(syn::ExprLit { lit: Lit::Bool(b), .. }) => out.cache_skip_unhashable = Some(b.value),
                    _ => {
                        return Err(syn::Error::new(
                            value.span(),
                            "`cache_skip_unhashable` takes true or false",
                        ));
                    }
                },
                "refresh_cache" => match value {
                    Expr::Lit(syn::ExprLit { lit: Lit::Bool(b), .. }) => out.refresh_cache = Some(b.value),
                    _ => return Err(syn::Error::new(value.span(), "`refresh_cache` takes true or false")),
                },
                "storage_key" => {
                    out.storage_key = Some(string(value, "storage_key", "`storage_key = \"images/{run.id}.png\"`")?)
                }
                _ => return Err(unknown(&meta, &key)),
            }
        }
        Ok(out)
    }

    pub(crate) fn name(&self) -> Option<&syn::LitStr> {
        self.name.as_ref()
    }

    pub(crate) fn serializer(&self) -> Option<&Expr> {
        self.serializer.as_ref()
    }

    /// Checks that the inputs a cache policy leaves out are parameters.
    pub(crate) fn check_cache(&self, params: &[String]) -> syn::Result<()> {
        let Some(expr) = &self.cache_expr else { return Ok(()) };
        let mut excluded = Vec::new();
        excluded_inputs(expr, &mut excluded);
        for name in excluded {
            if !params.iter().any(|p| name == p) {
                return Err(syn::Error::new(
                    name.span(),
                    format!(
                        "`cache`: there is no input `{name}` to leave out (inputs: {})",
                        params.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks the storage_key template's fields against the function's parameters.
    pub(crate) fn check_storage_key(&self, params: &[String]) -> syn::Result<()> {
        let Some(lit) = &self.storage_key else { return Ok(()) };
        let template = lit.value();
        let mut rest = template.as_str();
        while let Some(open) = rest.find('{') {
            let Some(len) = rest[open..].find('}') else {
                return Err(syn::Error::new(lit.span(), "`storage_key`: a '{' is never closed"));
            };
            let field = &rest[open + 1..open + len];
            let known = matches!(
                field,
                "run.id" | "run.name" | "task_run.id" | "task_run.name" | "flow_run.id" | "flow_run.name"
            );
            if !known {
                match field.strip_prefix("parameters.") {
                    Some(p) if params.iter().any(|n| n == p) => {}
                    Some(p) => {
                        return Err(syn::Error::new(
                            lit.span(),
                            format!(
                                "`storage_key`: there is no parameter `{p}` (parameters: {})",
                                params.join(", ")
                            ),
                        ));
                    }
                    None => {
                        return Err(syn::Error::new(
                            lit.span(),
                            format!(
                                "`storage_key`: unknown field {{{field}}}; fields: run.id, run.name, flow_run.id, \
                                 flow_run.name, parameters.<name>"
                            ),
                        ));
                    }
                }
            }
            rest = &rest[open + len + 1..];
        }
        if template.starts_with('/') || template.split('/').any(|s| s == "..") {
            return Err(syn::Error::new(
                lit.span(),
                "`storage_key` must be relative and must not contain '..'",
            ));
        }
        Ok(())
    }

    /// An expression building `kiln::Options<E>`.
    pub(crate) fn builder(&self) -> TokenStream {
        let mut calls = TokenStream::new();
        if let Some(n) = &self.name {
            calls.extend(quote!(.name(#n)));
        }
        if let Some(r) = self.retries {
            calls.extend(quote!(.retries(#r)));
        }
        if let Some(d) = &self.retry_delay {
            calls.extend(quote!(.retry_delay(#d)));
        }
        if let Some(f) = &self.retry_if {
            calls.extend(quote_spanned!(f.span()=> .retry_if(#f)));
        }
        if let Some(t) = &self.timeout {
            calls.extend(quote!(.timeout(#t)));
        }
        if let Some(tags) = &self.tags {
            calls.extend(quote!(.tags([#(#tags),*])));
        }
        if let Some(p) = self.persist {
            calls.extend(quote!(.persist(#p)));
        }
        if let Some(s) = &self.storage {
            calls.extend(quote!(.storage(#s)));
        }
        if let Some(k) = &self.storage_key {
            calls.extend(quote!(.storage_key(#k)));
        }
        if let Some(p) = &self.pool {
            calls.extend(quote!(.pool(#p)));
        }
        let key_fn = self
            .cache_key_fn
            .as_ref()
            .map(|f| quote!(::kiln::CachePolicy::key_fn(#f)));
        match (&self.cache, key_fn) {
            (Some(c), Some(f)) => calls.extend(quote!(.cache((#c).and(#f)))),
            (Some(c), None) => calls.extend(quote!(.cache(#c))),
            (None, Some(f)) => calls.extend(quote!(.cache(#f))),
            (None, None) => {}
        }
        if let Some(e) = &self.cache_expiration {
            calls.extend(quote!(.cache_expiration(#e)));
        }
        if let Some(r) = self.refresh_cache {
            calls.extend(quote!(.refresh_cache(#r)));
        }
        if let Some(i) = &self.isolation {
            calls.extend(quote!(.isolation(#i)));
        }
        if let Some(skip) = self.cache_skip_unhashable {
            calls.extend(quote!(.cache_skip_unhashable(#skip)));
        }
        if let Some(h) = &self.on_commit {
            calls.extend(quote_spanned!(h.span()=> .on_commit(#h)));
        }
        if let Some(h) = &self.on_rollback {
            calls.extend(quote_spanned!(h.span()=> .on_rollback(#h)));
        }
        quote!(::kiln::Options::new() #calls)
    }
}

fn unknown(meta: &Meta, key: &str) -> syn::Error {
    let hint = KNOWN
        .split(", ")
        .find(|k| close(k, key))
        .map(|k| format!("; did you mean `{k}`?"))
        .unwrap_or_default();
    syn::Error::new(
        meta.path().span(),
        format!("unknown option `{key}`{hint} (options: {KNOWN})"),
    )
}

/// Two option names that differ by a typo (at most two edits).
fn close(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()] <= 2
}

fn string(value: &Expr, key: &str, example: &str) -> syn::Result<syn::LitStr> {
    match value {
        Expr::Lit(l) => match &l.lit {
            Lit::Str(s) => Ok(s.clone()),
            _ => Err(syn::Error::new(
                value.span(),
                format!("`{key}` takes a string, like {example}"),
            )),
        },
        _ => Err(syn::Error::new(
            value.span(),
            format!("`{key}` takes a string, like {example}"),
        )),
    }
}

fn retries(value: &Expr) -> syn::Result<u32> {
    let msg = "`retries` takes a whole number from 0 to 1000, like `retries = 3`";
    match value {
        Expr::Lit(l) => match &l.lit {
            Lit::Int(i) => i
                .base10_parse::<u32>()
                .ok()
                .filter(|n| *n <= 1000)
                .ok_or_else(|| syn::Error::new(i.span(), msg)),
            _ => Err(syn::Error::new(value.span(), msg)),
        },
        _ => Err(syn::Error::new(value.span(), msg)),
    }
}

/// Seconds (an integer or float literal) or a human duration string, as nanoseconds.
fn duration(value: &Expr, key: &str, zero_ok: bool) -> syn::Result<u64> {
    let msg = format!("`{key}` takes seconds (`{key} = 2.5`) or a duration string (`{key} = \"1m 30s\"`)");
    let secs = match value {
        Expr::Lit(l) => match &l.lit {
            Lit::Int(i) => i.base10_parse::<f64>()?,
            Lit::Float(f) => f.base10_parse::<f64>()?,
            Lit::Str(s) => humantime::parse_duration(&s.value())
                .map_err(|e| {
                    syn::Error::new(
                        s.span(),
                        format!("`{key}`: cannot read \"{}\" as a duration: {e}", s.value()),
                    )
                })?
                .as_secs_f64(),
            _ => return Err(syn::Error::new(value.span(), msg)),
        },
        Expr::Unary(u) if matches!(u.op, syn::UnOp::Neg(_)) => {
            return Err(syn::Error::new(value.span(), format!("`{key}` must not be negative")));
        }
        _ => return Err(syn::Error::new(value.span(), msg)),
    };
    if secs < 0.0 {
        return Err(syn::Error::new(value.span(), format!("`{key}` must not be negative")));
    }
    if !secs.is_finite() || secs > 1e9 {
        return Err(syn::Error::new(value.span(), format!("`{key}` is too large")));
    }
    if secs == 0.0 && !zero_ok {
        return Err(syn::Error::new(value.span(), format!("`{key}` must be more than zero")));
    }
    Ok((secs * 1e9).round() as u64)
}

fn nanos(n: u64) -> TokenStream {
    quote!(::std::time::Duration::from_nanos(#n))
}

fn retry_delay(value: &Expr) -> syn::Result<TokenStream> {
    match value {
        Expr::Array(a) => {
            if a.elems.is_empty() {
                return Err(syn::Error::new(a.span(), "`retry_delay` list must not be empty"));
            }
            let items = a
                .elems
                .iter()
                .map(|e| duration(e, "retry_delay", true).map(nanos))
                .collect::<syn::Result<Vec<_>>>()?;
            Ok(quote!(::kiln::RetryDelay::List(::std::vec![#(#items),*])))
        }
        Expr::Call(call) => {
            let is_exp = matches!(&*call.func, Expr::Path(p) if p.path.is_ident("exponential"));
            if !is_exp {
                return Err(syn::Error::new(
                    call.func.span(),
                    "`retry_delay` takes seconds, a list `[1, 5, 30]`, or `exponential(base, max = 600, jitter = 0.2)`",
                ));
            }
            let mut args = call.args.iter();
            let base = args.next().ok_or_else(|| {
                syn::Error::new(
                    call.span(),
                    "`exponential` needs a base delay in seconds: `exponential(0.5)`",
                )
            })?;
            let base = nanos(duration(base, "retry_delay", false)?);
            let mut max = nanos(600_000_000_000);
            let mut jitter = quote!(0.2);
            for arg in args {
                let Expr::Assign(assign) = arg else {
                    return Err(syn::Error::new(
                        arg.span(),
                        "expected `max = seconds` or `jitter = fraction`",
                    ));
                };
                match &*assign.left {
                    Expr::Path(p) if p.path.is_ident("max") => max = nanos(duration(&assign.right, "max", false)?),
                    Expr::Path(p) if p.path.is_ident("jitter") => {
                        let j = match &*assign.right {
                            Expr::Lit(l) => match &l.lit {
                                Lit::Float(f) => f.base10_parse::<f64>().ok(),
                                Lit::Int(i) => i.base10_parse::<f64>().ok(),
                                _ => None,
                            },
                            _ => None,
                        }
                        .filter(|j| (0.0..=1.0).contains(j))
                        .ok_or_else(|| syn::Error::new(assign.right.span(), "`jitter` is a fraction from 0 to 1"))?;
                        jitter = j.to_token_stream();
                    }
                    other => {
                        return Err(syn::Error::new(
                            other.span(),
                            "expected `max = seconds` or `jitter = fraction`",
                        ));
                    }
                }
            }
            Ok(quote!(::kiln::RetryDelay::Exponential { base: #base, max: #max, jitter: #jitter }))
        }
        _ => {
            let d = duration(value, "retry_delay", true)?;
            Ok(quote!(::kiln::RetryDelay::Fixed(::std::time::Duration::from_nanos(#d))))
        }
    }
}

/// `inputs`, `task_source`, `flow_parameters`, `run_id`, `none`, joined with `+`, and `- name`
/// to leave an input out: `inputs + task_source - client`.
fn cache_policy(value: &Expr) -> syn::Result<TokenStream> {
    match value {
        Expr::Binary(b) => {
            let left = cache_policy(&b.left)?;
            match b.op {
                syn::BinOp::Add(_) => {
                    let right = cache_policy(&b.right)?;
                    Ok(quote!((#left).and(#right)))
                }
                syn::BinOp::Sub(_) => match &*b.right {
                    Expr::Path(p) if p.path.get_ident().is_some() => {
                        let name = p.path.get_ident().map(ToString::to_string);
                        Ok(quote!((#left).without(#name)))
                    }
                    other => Err(syn::Error::new(
                        other.span(),
                        "after `-` comes the name of an input to leave out",
                    )),
                },
                _ => Err(syn::Error::new(
                    b.op.span(),
                    "cache policies combine with `+` (and `- input`)",
                )),
            }
        }
        Expr::Path(p) => {
            let name = p.path.get_ident().map(ToString::to_string).unwrap_or_default();
            match name.as_str() {
                "inputs" | "task_source" | "flow_parameters" | "run_id" | "none" => {
                    let f = syn::Ident::new(&name, p.span());
                    Ok(quote!(::kiln::CachePolicy::#f()))
                }
                _ => Err(syn::Error::new(
                    p.span(),
                    "unknown cache policy; use inputs, task_source, flow_parameters, run_id or none, joined with `+`",
                )),
            }
        }
        Expr::Paren(p) => cache_policy(&p.expr),
        _ => Err(syn::Error::new(
            value.span(),
            "`cache` takes a policy such as `inputs + task_source`",
        )),
    }
}

/// The input names a policy leaves out, for checking against the parameters.
pub(crate) fn excluded_inputs(value: &Expr, out: &mut Vec<syn::Ident>) {
    match value {
        Expr::Binary(b) => {
            excluded_inputs(&b.left, out);
            if let (syn::BinOp::Sub(_), Expr::Path(p)) = (&b.op, &*b.right)
                && let Some(i) = p.path.get_ident()
            {
                out.push(i.clone());
            }
        }
        Expr::Paren(p) => excluded_inputs(&p.expr, out),
        _ => {}
    }
}

fn tags(value: &Expr) -> syn::Result<Vec<syn::LitStr>> {
    let msg = "`tags` takes a list of strings, like `tags = [\"nightly\", \"images\"]`";
    let Expr::Array(a) = value else {
        return Err(syn::Error::new(value.span(), msg));
    };
    a.elems
        .iter()
        .map(|e| string(e, "tags", "`tags = [\"nightly\"]`"))
        .collect()
}
