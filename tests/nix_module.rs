//! Keeps the NixOS module (`nix/module.nix`) in step with the helper and with its documentation:
//!
//! 1. the module's option names, and the keys it writes into the JSON file, are the keys the
//!    helper accepts (`wg_namespace::config::{NAMESPACE_KEYS, PEER_KEYS, ALTERNATIVE_KEYS,
//!    PUBLISH_KEYS, HOST_SERVICE_KEYS, FORWARDING_KEYS}`);
//! 2. `docs/options.md` is what the module's options render to; regenerate it with
//!    `UPDATE_OPTIONS_DOC=1 cargo test --test nix_module`;
//! 3. every `.nix` file in the repository parses with `nix-instantiate --parse`.
//!
//! The module is read with rnix, not evaluated. The reader follows what the module's `options`
//! attribute set is built from: `mkOption { ... }` calls, nested attribute sets, let-bound
//! names, calls of let-bound functions (`namespaceOptions "vpn"`), `//`, and submodule types
//! (`types.listOf (types.submodule { options = peerOptions; })`). Anything else in that part of
//! the module is reported as a failure rather than skipped.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use rnix::SyntaxNode;
use rnix::ast::{self, HasEntry};
use wg_namespace::config::{
    ALTERNATIVE_KEYS, FORWARDING_KEYS, HOST_SERVICE_KEYS, NAMESPACE_KEYS, PEER_KEYS, PUBLISH_KEYS,
};

/// Options that exist only in the module and never reach the helper's JSON.
const MODULE_ONLY_OPTIONS: &[&str] =
    &["package", "restartOnUnhealthy", "metrics", "desktopEntries"];

const SEED_PREFIX: &str = "services.wireguard-namespace";
const SET_PREFIX: &str = "services.wireguard-namespaces.<name>";
const OPTIONS_DOC: &str = "docs/options.md";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// rnix's typed nodes implement rowan's `AstNode`, which is not a dependency of this crate; its
// `syntax()` is reachable through rnix's own `AstNode` bound.
fn syntax<N: ast::AstNode>(node: &N) -> SyntaxNode {
    node.syntax().clone()
}

fn source<N: ast::AstNode>(node: &N) -> String {
    node.syntax().text().to_string()
}

/// Where a node starts, as `line:column`, for messages.
fn position(module: &str, node: &SyntaxNode) -> String {
    let offset = usize::from(node.text_range().start());
    let before = &module[..offset];
    let line = before.matches('\n').count() + 1;
    let column = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("nix/module.nix:{line}:{column}")
}

/// Looks through parentheses.
fn strip(expr: ast::Expr) -> ast::Expr {
    match expr {
        ast::Expr::Paren(p) => p.expr().map_or(ast::Expr::Paren(p), strip),
        other => other,
    }
}

fn ident_name(ident: &ast::Ident) -> Option<String> {
    ident.ident_token().map(|t| t.text().to_string())
}

/// The names of an attribute path (`options.wireguardNamespace`); `None` for dynamic parts.
fn attrpath_names(path: &ast::Attrpath) -> Option<Vec<String>> {
    path.attrs()
        .map(|attr| match attr {
            ast::Attr::Ident(i) => ident_name(&i),
            ast::Attr::Str(s) => literal_string(&s),
            ast::Attr::Dynamic(_) => None,
        })
        .collect()
}

/// The value of a string without interpolations, with indented strings de-indented as Nix does.
fn literal_string(s: &ast::Str) -> Option<String> {
    let mut out = String::new();
    for part in s.normalized_parts() {
        match part {
            ast::InterpolPart::Literal(text) => out.push_str(&text),
            ast::InterpolPart::Interpolation(_) => return None,
        }
    }
    Some(out)
}

/// The name a function is called by: `mkOption`, `types.listOf`, `lib.types.ints.between` are
/// `mkOption`, `listOf` and `ints.between`.
fn function_name(expr: &ast::Expr) -> Option<String> {
    let name = match strip(expr.clone()) {
        ast::Expr::Ident(i) => ident_name(&i)?,
        ast::Expr::Select(s) if s.default_expr().is_none() => {
            source(&s).chars().filter(|c| !c.is_whitespace()).collect()
        }
        _ => return None,
    };
    let name = name.strip_prefix("lib.").unwrap_or(&name);
    Some(name.strip_prefix("types.").unwrap_or(name).to_string())
}

/// A call `f a b` as `f` and `[a, b]`.
fn call(expr: &ast::Expr) -> Option<(ast::Expr, Vec<ast::Expr>)> {
    let mut args = Vec::new();
    let mut current = strip(expr.clone());
    while let ast::Expr::Apply(apply) = current {
        args.push(apply.argument()?);
        current = strip(apply.lambda()?);
    }
    if args.is_empty() {
        return None;
    }
    args.reverse();
    Some((current, args))
}

/// The entries of an attribute set with plain names, in source order.
fn entries(set: &ast::AttrSet) -> Vec<(Vec<String>, ast::Expr)> {
    set.attrpath_values()
        .filter_map(|entry| Some((attrpath_names(&entry.attrpath()?)?, entry.value()?)))
        .collect()
}

fn field(set: &ast::AttrSet, name: &str) -> Option<ast::Expr> {
    entries(set)
        .into_iter()
        .find(|(path, _)| path.len() == 1 && path[0] == name)
        .map(|(_, value)| value)
}

/// Keys of an attribute set: `name = ...;` entries and the names of `inherit` entries.
fn keys(set: &ast::AttrSet) -> Vec<String> {
    let mut out = Vec::new();
    for entry in set.entries() {
        match entry {
            ast::Entry::AttrpathValue(value) => {
                if let Some(path) = value.attrpath().and_then(|p| attrpath_names(&p)) {
                    out.push(path[0].clone());
                }
            }
            ast::Entry::Inherit(inherit) => {
                for attr in inherit.attrs() {
                    if let ast::Attr::Ident(i) = attr {
                        out.extend(ident_name(&i));
                    }
                }
            }
        }
    }
    out
}

/// One documented option.
#[derive(Debug)]
struct NixOption {
    name: String,
    type_: String,
    /// Markdown, or `None` for an option that must be set.
    default: Option<String>,
    /// Markdown.
    example: Option<String>,
    description: String,
}

/// Identifiers bound to the source text they stand for (function parameters).
type Subst = HashMap<String, String>;

struct Module {
    text: String,
    bindings: HashMap<String, ast::Expr>,
    /// The module's `options = ...` and `options.<path> = ...` entries: path below `options`
    /// and value.
    options: Vec<(Vec<String>, ast::Expr)>,
}

impl Module {
    fn load() -> Module {
        let path = repo().join("nix/module.nix");
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Module::parse(text)
    }

    fn parse(text: String) -> Module {
        let parse = rnix::Root::parse(&text);
        assert!(
            parse.errors().is_empty(),
            "nix/module.nix does not parse: {:?}",
            parse.errors()
        );
        let root = parse.tree();
        let body = match root.expr().map(strip) {
            Some(ast::Expr::Lambda(lambda)) => lambda.body().map(strip),
            _ => None,
        };
        let Some(ast::Expr::LetIn(let_in)) = body else {
            panic!(
                "nix/module.nix must be `{{ ... }}: let ... in {{ options = ...; config = ...; }}`"
            );
        };
        let mut bindings = HashMap::new();
        for entry in let_in.attrpath_values() {
            let path = entry.attrpath().and_then(|p| attrpath_names(&p));
            if let (Some(path), Some(value)) = (path, entry.value())
                && path.len() == 1
            {
                bindings.insert(path[0].clone(), value);
            }
        }
        let Some(ast::Expr::AttrSet(module)) = let_in.body().map(strip) else {
            panic!("the `in` part of nix/module.nix must be an attribute set");
        };
        let options: Vec<_> = entries(&module)
            .into_iter()
            .filter(|(path, _)| path[0] == "options")
            .map(|(path, value)| (path[1..].to_vec(), value))
            .collect();
        assert!(!options.is_empty(), "nix/module.nix declares no options");
        Module {
            text,
            bindings,
            options,
        }
    }

    fn at(&self, node: &SyntaxNode) -> String {
        position(&self.text, node)
    }

    /// Every option the module declares, in source order.
    fn options(&self) -> Vec<NixOption> {
        self.try_options()
            .unwrap_or_else(|e| panic!("cannot read the options of nix/module.nix: {e}"))
    }

    fn try_options(&self) -> Result<Vec<NixOption>, String> {
        let mut out = Vec::new();
        for (path, value) in &self.options {
            self.walk(value, path, &Subst::new(), &mut out)?;
        }
        Ok(out)
    }

    /// Walks an expression that evaluates to an option set.
    fn walk(
        &self,
        expr: &ast::Expr,
        prefix: &[String],
        subst: &Subst,
        out: &mut Vec<NixOption>,
    ) -> Result<(), String> {
        let expr = strip(expr.clone());
        match &expr {
            ast::Expr::AttrSet(set) => {
                for (path, value) in entries(set) {
                    self.walk(&value, &[prefix, &path[..]].concat(), subst, out)?;
                }
                Ok(())
            }
            ast::Expr::Ident(ident) => {
                let name = ident_name(ident).unwrap_or_default();
                match self.bindings.get(&name) {
                    Some(value) => self.walk(value, prefix, subst, out),
                    None => Err(format!(
                        "{}: `{name}` is not let-bound",
                        self.at(&syntax(ident))
                    )),
                }
            }
            ast::Expr::BinOp(op) if op.operator() == Some(ast::BinOpKind::Update) => {
                let (Some(lhs), Some(rhs)) = (op.lhs(), op.rhs()) else {
                    return Err(format!("{}: incomplete `//`", self.at(&syntax(op))));
                };
                self.walk(&lhs, prefix, subst, out)?;
                self.walk(&rhs, prefix, subst, out)
            }
            _ => {
                let Some((function, args)) = call(&expr) else {
                    return Err(self.unreadable(&expr));
                };
                match function_name(&function).as_deref() {
                    Some("mkOption") => match args.as_slice() {
                        [ast::Expr::AttrSet(attrs)] => self.option(attrs, prefix, subst, out),
                        _ => Err(self.unreadable(&expr)),
                    },
                    Some(name) => self.apply(name, &args, prefix, subst, out, &expr),
                    None => Err(self.unreadable(&expr)),
                }
            }
        }
    }

    /// A call of a let-bound function of one argument that returns an option set.
    fn apply(
        &self,
        name: &str,
        args: &[ast::Expr],
        prefix: &[String],
        subst: &Subst,
        out: &mut Vec<NixOption>,
        expr: &ast::Expr,
    ) -> Result<(), String> {
        let Some(ast::Expr::Lambda(lambda)) = self.bindings.get(name).cloned().map(strip) else {
            return Err(self.unreadable(expr));
        };
        let param = match lambda.param() {
            Some(ast::Param::IdentParam(p)) => p.ident().and_then(|i| ident_name(&i)),
            _ => None,
        };
        let (Some(param), [arg], Some(body)) = (param, args, lambda.body()) else {
            return Err(self.unreadable(expr));
        };
        let mut inner = subst.clone();
        inner.insert(param, self.expr_text(arg, subst));
        self.walk(&body, prefix, &inner, out)
    }

    fn unreadable(&self, expr: &ast::Expr) -> String {
        let text = source(expr);
        let first = text.lines().next().unwrap_or_default();
        format!(
            "{}: expected an option set, got `{first}`",
            self.at(&syntax(expr))
        )
    }

    /// Source text of an expression, with function parameters replaced by their arguments.
    fn expr_text(&self, expr: &ast::Expr, subst: &Subst) -> String {
        if let ast::Expr::Ident(i) = strip(expr.clone())
            && let Some(value) = ident_name(&i).and_then(|n| subst.get(&n))
        {
            return value.clone();
        }
        dedent(&source(expr))
    }

    fn option(
        &self,
        attrs: &ast::AttrSet,
        prefix: &[String],
        subst: &Subst,
        out: &mut Vec<NixOption>,
    ) -> Result<(), String> {
        let here = self.at(&syntax(attrs));
        let type_ = field(attrs, "type").ok_or_else(|| format!("{here}: mkOption without type"))?;

        // A declaration without a description adds to an option declared elsewhere (here:
        // systemd.services); only the options of its submodule are this module's own.
        if let Some(description) = field(attrs, "description") {
            let description = match strip(description) {
                ast::Expr::Str(s) => literal_string(&s),
                _ => None,
            }
            .ok_or_else(|| format!("{here}: the description must be a string without ${{...}}"))?;
            let default = match field(attrs, "defaultText") {
                Some(text) => Some(self.literal(&text, subst)),
                None => field(attrs, "default").map(|d| code(&self.expr_text(&d, subst))),
            };
            let example = field(attrs, "example").map(|e| self.literal(&e, subst));
            out.push(NixOption {
                name: prefix.join("."),
                type_: render_type(&type_),
                default,
                example,
                description: description.trim().to_string(),
            });
        }

        if let Some((suffix, module, subst)) = self.submodule(&type_, subst)? {
            let prefix: Vec<String> = [prefix, &suffix[..]].concat();
            let ast::Expr::AttrSet(set) = strip(module.clone()) else {
                return Err(self.unreadable(&module));
            };
            for (path, value) in entries(&set) {
                if path[0] == "options" {
                    self.walk(&value, &[&prefix[..], &path[1..]].concat(), &subst, out)?;
                }
            }
        }
        Ok(())
    }

    /// The submodule inside an option type, with the name parts it adds to option names
    /// (`*` for list elements, `<name>` for attribute set values).
    #[allow(clippy::type_complexity)]
    fn submodule(
        &self,
        type_: &ast::Expr,
        subst: &Subst,
    ) -> Result<Option<(Vec<String>, ast::Expr, Subst)>, String> {
        let Some((function, args)) = call(type_) else {
            return Ok(None);
        };
        let part = match function_name(&function).as_deref() {
            Some("listOf") => Some("*"),
            Some("attrsOf" | "lazyAttrsOf") => Some("<name>"),
            Some("nullOr") => None,
            Some("submodule") => {
                let [module] = args.as_slice() else {
                    return Err(self.unreadable(type_));
                };
                let mut subst = subst.clone();
                // `{ name, ... }: { ... }`: the module of one attribute, documented as <name>.
                let module = match strip(module.clone()) {
                    ast::Expr::Lambda(lambda) => {
                        if let Some(ast::Param::Pattern(pattern)) = lambda.param() {
                            for entry in pattern.pat_entries() {
                                if entry.ident().and_then(|i| ident_name(&i)).as_deref()
                                    == Some("name")
                                {
                                    subst.insert("name".into(), "\"<name>\"".into());
                                }
                            }
                        }
                        lambda.body().ok_or_else(|| self.unreadable(module))?
                    }
                    other => other,
                };
                return Ok(Some((Vec::new(), module, subst)));
            }
            _ => return Ok(None),
        };
        let Some(inner) = args.last() else {
            return Ok(None);
        };
        Ok(self
            .submodule(inner, subst)?
            .map(|(mut suffix, module, subst)| {
                if let Some(part) = part {
                    suffix.insert(0, part.to_string());
                }
                (suffix, module, subst)
            }))
    }

    /// `literalExpression "..."` as code, `literalMD "..."` as Markdown, anything else as code.
    fn literal(&self, expr: &ast::Expr, subst: &Subst) -> String {
        if let Some((function, args)) = call(expr)
            && let [ast::Expr::Str(s)] = args.as_slice()
            && let Some(text) = literal_string(s)
        {
            match function_name(&function).as_deref() {
                Some("literalExpression") => return code(text.trim_end()),
                Some("literalMD") => return text.trim().to_string(),
                _ => {}
            }
        }
        code(&self.expr_text(expr, subst))
    }

    /// The keys of the attribute set a let-bound `x: { ... }` function returns.
    fn returned_keys(&self, binding: &str) -> Vec<String> {
        let Some(ast::Expr::Lambda(lambda)) = self.bindings.get(binding).cloned().map(strip) else {
            panic!("nix/module.nix has no let-bound function `{binding}`");
        };
        match lambda.body().map(strip) {
            Some(ast::Expr::AttrSet(set)) => keys(&set),
            _ => panic!("`{binding}` in nix/module.nix must return an attribute set literal"),
        }
    }

    /// Follows let-bound names, parentheses and the bodies of functions (`name: ns: ...`).
    fn resolve(&self, expr: ast::Expr) -> ast::Expr {
        match strip(expr) {
            ast::Expr::Ident(i) => match ident_name(&i).and_then(|n| self.bindings.get(&n)) {
                Some(bound) => self.resolve(bound.clone()),
                None => ast::Expr::Ident(i),
            },
            ast::Expr::Lambda(lambda) => match lambda.body() {
                Some(body) => self.resolve(body),
                None => ast::Expr::Lambda(lambda),
            },
            // `f x` where f is let-bound: what f returns (its arguments do not matter here).
            ast::Expr::Apply(apply) => match apply.lambda().map(|f| self.resolve(f)) {
                Some(ast::Expr::Lambda(_)) | None => ast::Expr::Apply(apply),
                Some(body) => body,
            },
            other => other,
        }
    }

    /// The entries of an attribute set expression built from literals, let-bound names and
    /// `//`, the right side winning as in Nix; `None` when it is made some other way.
    fn attrs(&self, expr: ast::Expr) -> Option<HashMap<String, ast::Expr>> {
        match self.resolve(expr) {
            ast::Expr::AttrSet(set) => Some(
                entries(&set)
                    .into_iter()
                    .filter(|(path, _)| path.len() == 1)
                    .map(|(mut path, value)| (path.remove(0), value))
                    .collect(),
            ),
            ast::Expr::BinOp(op) if op.operator() == Some(ast::BinOpKind::Update) => {
                let mut left = self.attrs(op.lhs()?)?;
                left.extend(self.attrs(op.rhs()?)?);
                Some(left)
            }
            _ => None,
        }
    }

    /// The `serviceConfig` a let-bound unit function (`refreshUnit`, ...) writes.
    fn service_config(&self, unit: &str) -> HashMap<String, ast::Expr> {
        let body = self
            .bindings
            .get(unit)
            .unwrap_or_else(|| panic!("nix/module.nix has no let-bound `{unit}`"));
        let unit_attrs = self
            .attrs(body.clone())
            .unwrap_or_else(|| panic!("cannot read the attribute set `{unit}` returns"));
        let service = unit_attrs
            .get("serviceConfig")
            .unwrap_or_else(|| panic!("`{unit}` sets no serviceConfig"));
        self.attrs(service.clone())
            .unwrap_or_else(|| panic!("cannot read the serviceConfig of `{unit}`"))
    }

    /// A value as written, with let-bound names followed and blanks squeezed; string lists as
    /// their strings joined by spaces.
    fn value(&self, expr: &ast::Expr) -> String {
        match self.resolve(expr.clone()) {
            ast::Expr::List(list) => list
                .items()
                .map(|item| self.value(&item))
                .collect::<Vec<_>>()
                .join(" "),
            ast::Expr::Str(s) => s
                .normalized_parts()
                .into_iter()
                .map(|part| match part {
                    ast::InterpolPart::Literal(text) => text,
                    ast::InterpolPart::Interpolation(i) => source(&i),
                })
                .collect(),
            other => source(&other)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// Removes the indentation a multi-line expression has from its place in the file.
fn dedent(text: &str) -> String {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    let rest: Vec<&str> = lines.collect();
    let indent = rest
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out = first.to_string();
    for line in rest {
        out.push('\n');
        out.push_str(line.get(indent..).unwrap_or("").trim_end());
    }
    out
}

/// Inline code, or a fenced block (starting on a line of its own) for several lines.
fn code(text: &str) -> String {
    if text.contains('\n') {
        format!("\n```nix\n{text}\n```")
    } else {
        format!("`{text}`")
    }
}

/// `*Label:* value`, with a block value in a paragraph of its own.
fn labelled(label: &str, value: &str) -> String {
    match value.strip_prefix('\n') {
        Some(block) => format!("\n*{label}:*\n\n{block}\n"),
        None => format!("\n*{label}:* {value}\n"),
    }
}

/// A type as the NixOS manual describes it.
fn render_type(expr: &ast::Expr) -> String {
    let expr = match strip(expr.clone()) {
        ast::Expr::With(with) => match with.body() {
            Some(body) => strip(body),
            None => return source(&with),
        },
        other => other,
    };
    let (name, args) = match call(&expr) {
        Some((function, args)) => (function_name(&function), args),
        None => (function_name(&expr), Vec::new()),
    };
    let inner = |i: usize| args.get(i).map(render_type).unwrap_or_default();
    let composite = |i: usize| {
        let text = inner(i);
        if text == "submodule" {
            "(submodule)".to_string()
        } else {
            text
        }
    };
    match (name.as_deref(), args.len()) {
        (Some("str"), 0) => "string".into(),
        (Some("bool"), 0) => "boolean".into(),
        (Some("int"), 0) => "signed integer".into(),
        (Some("package"), 0) => "package".into(),
        (Some("path"), 0) => "path".into(),
        (Some("port"), 0) => "16 bit unsigned integer; between 0 and 65535 (both inclusive)".into(),
        (Some("submodule"), 1) => "submodule".into(),
        (Some("listOf"), 1) => format!("list of {}", composite(0)),
        (Some("attrsOf"), 1) => format!("attribute set of {}", composite(0)),
        (Some("nullOr"), 1) => format!("null or {}", composite(0)),
        (Some("ints.between"), 2) => format!(
            "integer between {} and {} (both inclusive)",
            source(&args[0]),
            source(&args[1])
        ),
        (Some("enum"), 1) => match strip(args[0].clone()) {
            ast::Expr::List(list) => {
                let items: Vec<String> = list.items().map(|i| source(&i)).collect();
                format!("one of {}", items.join(", "))
            }
            _ => source(&expr),
        },
        _ => source(&expr),
    }
}

/// Turns the NixOS manual's Markdown extensions into plain Markdown.
fn plain_markdown(text: &str) -> String {
    let text = text.replace("{option}`", "`").replace("{manpage}`", "`");
    let mut out = Vec::new();
    let mut admonition = false;
    for line in text.lines() {
        if let Some(kind) = line.trim().strip_prefix("::: {.") {
            let kind = kind.trim_end_matches('}');
            let mut title = kind.to_string();
            title[..1].make_ascii_uppercase();
            out.push(format!("> **{title}**"));
            out.push(">".to_string());
            admonition = true;
        } else if admonition && line.trim() == ":::" {
            admonition = false;
        } else if admonition {
            out.push(format!("> {line}").trim_end().to_string());
        } else {
            out.push(line.to_string());
        }
    }
    out.join("\n")
}

fn render_doc(options: &[NixOption]) -> String {
    let mut doc = String::from(
        "# NixOS options\n\n\
         <!-- Generated from nix/module.nix by tests/nix_module.rs; do not edit. Regenerate with\n     \
         UPDATE_OPTIONS_DOC=1 cargo test --test nix_module -->\n\n\
         The options of this flake's `nixosModules.default` (`nix/module.nix`).\n",
    );
    for option in options {
        doc.push_str(&format!("\n## `{}`\n\n", option.name));
        doc.push_str(&plain_markdown(&option.description));
        doc.push('\n');
        doc.push_str(&labelled("Type", &option.type_));
        let default = option.default.as_deref();
        doc.push_str(&labelled("Default", default.unwrap_or("none, must be set")));
        if let Some(example) = &option.example {
            doc.push_str(&labelled("Example", example));
        }
    }
    doc
}

/// Option names directly below `prefix`.
fn names_below(options: &[NixOption], prefix: &str) -> BTreeSet<String> {
    let prefix = format!("{prefix}.");
    options
        .iter()
        .filter_map(|o| o.name.strip_prefix(&prefix))
        .map(|rest| rest.split('.').next().unwrap_or_default().to_string())
        .collect()
}

fn assert_same_keys(what: &str, module: BTreeSet<String>, helper: &[&str], extras: &[&str]) {
    let helper: BTreeSet<String> = helper.iter().map(|k| k.to_string()).collect();
    let module: BTreeSet<String> = module
        .into_iter()
        .filter(|k| !extras.contains(&k.as_str()))
        .collect();
    let missing: Vec<_> = helper.difference(&module).collect();
    let unknown: Vec<_> = module.difference(&helper).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "{what} drifted from src/config.rs:\n  keys the helper reads but the module lacks: {missing:?}\n  \
         names in the module the helper does not know: {unknown:?}\n\
         (a module-only option belongs in MODULE_ONLY_OPTIONS in tests/nix_module.rs)"
    );
}

#[test]
fn option_names_match_the_helper_config_keys() {
    let options = Module::load().options();
    for prefix in [SEED_PREFIX, SET_PREFIX] {
        assert_same_keys(
            &format!("options {prefix}.*"),
            names_below(&options, prefix),
            NAMESPACE_KEYS,
            MODULE_ONLY_OPTIONS,
        );
        assert_same_keys(
            &format!("options {prefix}.peers.*.*"),
            names_below(&options, &format!("{prefix}.peers.*")),
            PEER_KEYS,
            &[],
        );
        assert_same_keys(
            &format!("options {prefix}.peers.*.alternatives.*.*"),
            names_below(&options, &format!("{prefix}.peers.*.alternatives.*")),
            ALTERNATIVE_KEYS,
            &[],
        );
        assert_same_keys(
            &format!("options {prefix}.publishPorts.*.*"),
            names_below(&options, &format!("{prefix}.publishPorts.*")),
            PUBLISH_KEYS,
            &[],
        );
        assert_same_keys(
            &format!("options {prefix}.hostServices.*.*"),
            names_below(&options, &format!("{prefix}.hostServices.*")),
            HOST_SERVICE_KEYS,
            &[],
        );
        assert_same_keys(
            &format!("options {prefix}.portForwarding.*"),
            names_below(&options, &format!("{prefix}.portForwarding")),
            FORWARDING_KEYS,
            &[],
        );
    }
    assert!(
        options
            .iter()
            .any(|o| o.name == "systemd.services.<name>.wireguardNamespace"),
        "nix/module.nix does not declare systemd.services.<name>.wireguardNamespace"
    );
}

#[test]
fn json_document_keys_match_the_helper_config_keys() {
    let module = Module::load();
    for (binding, helper) in [
        ("namespaceJson", NAMESPACE_KEYS),
        ("peerJson", PEER_KEYS),
        ("alternativeJson", ALTERNATIVE_KEYS),
        ("publishPortJson", PUBLISH_KEYS),
        ("hostServiceJson", HOST_SERVICE_KEYS),
        ("portForwardingJson", FORWARDING_KEYS),
    ] {
        let written = module.returned_keys(binding);
        let unique: BTreeSet<String> = written.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            written.len(),
            "`{binding}` repeats a key: {written:?}"
        );
        assert_same_keys(&format!("the keys `{binding}` writes"), unique, helper, &[]);
    }
}

#[test]
fn options_doc_is_up_to_date() {
    let generated = render_doc(&Module::load().options());
    let path = repo().join(OPTIONS_DOC);
    if std::env::var_os("UPDATE_OPTIONS_DOC").is_some_and(|v| !v.is_empty() && v != "0") {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, &generated).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return;
    }
    let committed = fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()))
            + 1;
        panic!(
            "{OPTIONS_DOC} is out of date with nix/module.nix (first difference at line {line}).\n\
             Regenerate it with: UPDATE_OPTIONS_DOC=1 cargo test --test nix_module"
        );
    }
}

/// Every `.nix` file below `dir`, skipping build output and VCS data.
fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(read) = fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = read.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_dir() {
            if !matches!(
                name,
                ".git" | "target" | ".vm-cache" | "node_modules" | "result"
            ) {
                nix_files(&path, out);
            }
        } else if name.ends_with(".nix") {
            out.push(path);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let mut files = Vec::new();
    nix_files(&repo(), &mut files);
    let expected = [
        "flake.nix",
        "nix/module.nix",
        "nix/package.nix",
        "nix/tests/eval.nix",
    ];
    for name in expected {
        assert!(
            files.contains(&repo().join(name)),
            "{name} is missing from the repository"
        );
    }
    let mut failures = Vec::new();
    for file in &files {
        let output = match Command::new("nix-instantiate")
            .arg("--parse")
            .arg(file)
            .output()
        {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "nix-instantiate is not installed; install Nix (on Debian/Ubuntu: \
                 apt-get install nix-bin) to check the .nix files"
            ),
            Err(e) => panic!("running nix-instantiate: {e}"),
        };
        if !output.status.success() {
            failures.push(format!(
                "{}:\n{}",
                file.display(),
                String::from_utf8_lossy(&output.stderr).trim_end()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "Nix files that do not parse:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_reader_understands_the_constructs_it_claims() {
    let module = Module::parse(
        r#"{ lib, ... }:
let
  inner = { b = lib.mkOption { type = lib.types.nullOr (lib.types.ints.between 1 9); default = null; description = "B."; }; };
  outer = d: { a = lib.mkOption { type = lib.types.str; default = d; example = lib.literalExpression "x"; description = ''
      A.
    ''; }; };
in
{
  options.top = outer "v" // {
    list = lib.mkOption { type = lib.types.listOf (lib.types.submodule { options = inner; }); description = "L."; };
    set = lib.mkOption { type = lib.types.attrsOf (lib.types.submodule ({ name, ... }: { options = outer name; })); description = "S."; };
  };
  config = { };
}"#
        .to_string(),
    );
    let options = module.options();
    let summary: Vec<String> = options
        .iter()
        .map(|o| {
            format!(
                "{} | {} | {} | {} | {}",
                o.name,
                o.type_,
                o.default.as_deref().unwrap_or("-"),
                o.example.as_deref().unwrap_or("-"),
                o.description
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            "top.a | string | `\"v\"` | `x` | A.",
            "top.list | list of (submodule) | - | - | L.",
            "top.list.*.b | null or integer between 1 and 9 (both inclusive) | `null` | - | B.",
            "top.set | attribute set of (submodule) | - | - | S.",
            "top.set.<name>.a | string | `\"<name>\"` | `x` | A.",
        ]
    );
}

#[test]
fn the_reader_rejects_what_it_cannot_read() {
    let module = Module::parse(
        "{ lib, ... }: let x = 1; in { options.a = lib.mkEnableOption \"a\"; }".to_string(),
    );
    let error = module.try_options().unwrap_err();
    assert!(error.contains("expected an option set"), "{error}");
}

/// Settings that give a unit a mount namespace of its own. The namespace's own unit must have
/// none: the /run/netns/<name> mount `up` makes would then stay in that mount namespace,
/// unseen by the host and by the services that join the namespace.
const MOUNT_NAMESPACE_SETTINGS: &[&str] = &[
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectHostname",
    "ProtectProc",
    "ProcSubset",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "BindPaths",
    "BindReadOnlyPaths",
    "TemporaryFileSystem",
    "RootDirectory",
    "RootImage",
];

/// Capabilities no unit of the module needs: with one of them, a compromised helper could do
/// far more than its namespace takes.
const NEVER_NEEDED: &[&str] = &[
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_BOOT",
    "CAP_SYS_TIME",
    "CAP_MKNOD",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_BPF",
    "CAP_SYS_RESOURCE",
    "CAP_LINUX_IMMUTABLE",
    "CAP_AUDIT_CONTROL",
    "CAP_MAC_ADMIN",
];

/// What one companion unit's sandbox must hold beyond the common settings.
struct Sandbox {
    /// The let-bound function in nix/module.nix that makes the unit.
    unit: &'static str,
    /// Its own settings and their values.
    own: &'static [(&'static str, &'static str)],
    /// Capabilities it uses (see the comments in the module), so must keep.
    needed: &'static [&'static str],
    /// Its ReadWritePaths, as written.
    writes: &'static str,
}

#[test]
fn companion_units_are_sandboxed() {
    let module = Module::load();
    let common = [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "read-only"),
        ("PrivateTmp", "true"),
        ("NoNewPrivileges", "true"),
        ("ProtectKernelModules", "true"),
        ("ProtectKernelLogs", "true"),
        ("ProtectControlGroups", "true"),
        ("ProtectHostname", "true"),
        ("LockPersonality", "true"),
        ("RestrictRealtime", "true"),
        ("RestrictSUIDSGID", "true"),
        ("SystemCallArchitectures", "native"),
        (
            "RestrictAddressFamilies",
            "AF_UNIX AF_NETLINK AF_INET AF_INET6",
        ),
    ];
    let units = [
        Sandbox {
            unit: "refreshUnit",
            own: &[
                ("PrivateDevices", "true"),
                ("ProtectKernelTunables", "true"),
                ("MemoryDenyWriteExecute", "true"),
                ("RestrictNamespaces", "net"),
            ],
            needed: &[
                "CAP_NET_ADMIN",
                "CAP_SYS_ADMIN",
                "CAP_SYS_PTRACE",
                "CAP_DAC_READ_SEARCH",
                "CAP_CHOWN",
            ],
            writes: "-/run/wg-namespace -/var/lib/wg-namespace/${name}",
        },
        Sandbox {
            unit: "portForwardUnit",
            own: &[
                ("PrivateDevices", "true"),
                ("ProtectKernelTunables", "true"),
                ("RestrictNamespaces", "net mnt pid"),
            ],
            needed: &[
                "CAP_NET_ADMIN",
                "CAP_SYS_ADMIN",
                "CAP_SETUID",
                "CAP_SETGID",
                "CAP_SETPCAP",
                "CAP_KILL",
            ],
            writes: "-/run/wg-namespace",
        },
        Sandbox {
            unit: "healthUnit",
            own: &[
                ("KillMode", "process"),
                ("DevicePolicy", "closed"),
                ("DeviceAllow", "/dev/net/tun rw"),
                ("RestrictNamespaces", "net"),
            ],
            needed: &[
                "CAP_NET_ADMIN",
                "CAP_SYS_ADMIN",
                "CAP_NET_BIND_SERVICE",
                "CAP_SETUID",
                "CAP_SETGID",
                "CAP_SETPCAP",
                "CAP_KILL",
                "CAP_SYS_PTRACE",
            ],
            writes: "-/run/wg-namespace -/var/lib/wg-namespace/${name} -/etc/netns -/run/wireguard",
        },
    ];
    let mut failures = Vec::new();
    for Sandbox {
        unit,
        own,
        needed,
        writes,
    } in units
    {
        let settings = module.service_config(unit);
        let value = |key: &str| settings.get(key).map(|v| module.value(v));
        for (key, expected) in common.iter().chain(own) {
            if value(key).as_deref() != Some(*expected) {
                failures.push(format!(
                    "{unit}: {key} is {:?}, want {expected:?}",
                    value(key)
                ));
            }
        }
        let filter = value("SystemCallFilter").unwrap_or_default();
        for group in ["@debug", "@module", "@raw-io", "@reboot", "@clock"] {
            if !(filter.starts_with('~') && filter.contains(group)) {
                failures.push(format!(
                    "{unit}: SystemCallFilter {filter:?} lets {group} through"
                ));
            }
        }
        let capabilities = value("CapabilityBoundingSet").unwrap_or_default();
        let capabilities: BTreeSet<&str> = capabilities.split_whitespace().collect();
        if capabilities.is_empty() {
            failures.push(format!("{unit}: no CapabilityBoundingSet"));
        }
        for cap in needed.iter().filter(|c| !capabilities.contains(*c)) {
            failures.push(format!(
                "{unit}: CapabilityBoundingSet lacks {cap}, which it uses"
            ));
        }
        for cap in NEVER_NEEDED.iter().filter(|c| capabilities.contains(*c)) {
            failures.push(format!("{unit}: CapabilityBoundingSet keeps {cap}"));
        }
        if value("ReadWritePaths").as_deref() != Some(writes) {
            failures.push(format!(
                "{unit}: ReadWritePaths is {:?}, want {writes:?}",
                value("ReadWritePaths")
            ));
        }
    }

    let main = module.service_config("mainUnit");
    for key in MOUNT_NAMESPACE_SETTINGS
        .iter()
        .filter(|k| main.contains_key(**k))
    {
        failures.push(format!(
            "mainUnit sets {key}, which gives it a mount namespace of its own: the host would \
             not see /run/netns/<name>"
        ));
    }
    let main_value = |key: &str| main.get(key).map(|v| module.value(v)).unwrap_or_default();
    if main_value("NoNewPrivileges") != "true" {
        failures.push("mainUnit: NoNewPrivileges is not true".into());
    }
    let capabilities = main_value("CapabilityBoundingSet");
    if capabilities.is_empty() {
        failures.push("mainUnit: no CapabilityBoundingSet".into());
    }
    for cap in NEVER_NEEDED
        .iter()
        .filter(|c| capabilities.split_whitespace().any(|k| k == **c))
    {
        failures.push(format!("mainUnit: CapabilityBoundingSet keeps {cap}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_health_timer_fires_on_time() {
    let module = Module::load();
    let timer = module
        .attrs(module.bindings["healthTimer"].clone())
        .expect("healthTimer returns an attribute set");
    let config = module
        .attrs(timer["timerConfig"].clone())
        .expect("healthTimer's timerConfig is an attribute set");
    // systemd's default AccuracySec (1min) lets a 20 s interval fire up to 80 s apart.
    assert_eq!(
        config
            .get("AccuracySec")
            .map(|v| module.value(v))
            .as_deref(),
        Some("1s")
    );
}
