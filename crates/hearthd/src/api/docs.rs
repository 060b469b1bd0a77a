//! `/docs`: the API reference rendered from the OpenAPI document, self-contained (no scripts
//! or assets from elsewhere, so it works on hosts without internet access).

use axum::response::Html;
use utoipa::OpenApi;
use utoipa::openapi::path::Operation;

use super::ApiDoc;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn operation(out: &mut String, method: &str, path: &str, op: &Operation) {
    let summary = op
        .description
        .as_deref()
        .or(op.summary.as_deref())
        .unwrap_or("");
    out.push_str(&format!(
        "<section><h3><span class=m>{method}</span> <code>{}</code></h3><p>{}</p>",
        escape(path),
        escape(summary)
    ));
    if let Some(params) = &op.parameters {
        out.push_str("<table><tr><th>parameter</th><th>in</th><th>description</th></tr>");
        for p in params {
            out.push_str(&format!(
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                escape(&p.name),
                match p.parameter_in {
                    utoipa::openapi::path::ParameterIn::Path => "path",
                    utoipa::openapi::path::ParameterIn::Query => "query",
                    utoipa::openapi::path::ParameterIn::Header => "header",
                    utoipa::openapi::path::ParameterIn::Cookie => "cookie",
                },
                escape(p.description.as_deref().unwrap_or(""))
            ));
        }
        out.push_str("</table>");
    }
    out.push_str("<ul>");
    for (status, resp) in &op.responses.responses {
        let desc = match resp {
            utoipa::openapi::RefOr::T(r) => r.description.clone(),
            utoipa::openapi::RefOr::Ref(r) => r.ref_location.clone(),
        };
        out.push_str(&format!(
            "<li><b>{}</b> {}</li>",
            escape(status),
            escape(&desc)
        ));
    }
    out.push_str("</ul></section>");
}

pub async fn page() -> Html<String> {
    let doc = ApiDoc::openapi();
    let mut out = String::from(
        "<!doctype html><meta charset=utf-8><title>Hearth API</title><style>\
         body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}\
         .m{display:inline-block;min-width:4em;font-family:monospace;color:#a33}\
         table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em}\
         section{border-top:1px solid #ddd;margin-top:1em}</style>",
    );
    out.push_str(&format!(
        "<h1>{} {}</h1><p>{}</p><p>Machine-readable: <a href=/openapi.json>/openapi.json</a>. \
         Errors are JSON <code>{{\"error\": code, \"message\": text}}</code>.</p>",
        escape(&doc.info.title),
        env!("CARGO_PKG_VERSION"),
        escape(doc.info.description.as_deref().unwrap_or(""))
    ));
    for (path, item) in &doc.paths.paths {
        for (method, op) in [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("DELETE", &item.delete),
        ] {
            if let Some(op) = op {
                operation(&mut out, method, path, op);
            }
        }
    }
    Html(out)
}
