//! `set`, `branch`, `template` and `noop`.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::parse_params;
use crate::error::{NodeError, ParamError};
use crate::expr::{Expression, References, Template, ValueTemplate};
use crate::node::{Node, NodeContext, Output};

/// `set`: an object of fields, each a template or any JSON value (strings inside are rendered).
struct Set {
    fields: Vec<(String, ValueTemplate)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetParams {
    fields: Map<String, Value>,
}

pub(crate) fn set(params: &Value) -> Result<Box<dyn Node>, ParamError> {
    let p: SetParams = parse_params(params)?;
    let fields = p
        .fields
        .iter()
        .map(|(k, v)| {
            ValueTemplate::compile(v)
                .map(|t| (k.clone(), t))
                .map_err(|e| ParamError::new(format!("fields.{k}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    Ok(Box::new(Set { fields }))
}

#[async_trait]
impl Node for Set {
    async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
        let scope = cx.scope();
        let mut out = Map::with_capacity(self.fields.len());
        for (name, template) in &self.fields {
            let value = template
                .render(&scope)
                .map_err(|e| NodeError::fatal(format!("fields.{name}: {e}")))?;
            out.insert(name.clone(), value);
        }
        Ok(Value::Object(out).into())
    }

    fn references(&self) -> References {
        let mut refs = References::default();
        self.fields
            .iter()
            .for_each(|(_, t)| refs.merge(t.references()));
        refs
    }
}

/// `branch`: evaluates a condition; outputs the boolean and takes port `true` or `false`.
struct Branch {
    condition: Expression,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BranchParams {
    condition: String,
}

pub(crate) fn branch(params: &Value) -> Result<Box<dyn Node>, ParamError> {
    let p: BranchParams = parse_params(params)?;
    let condition = Expression::compile(&p.condition)
        .map_err(|e| ParamError::new(format!("condition: {e}")))?;
    Ok(Box::new(Branch { condition }))
}

#[async_trait]
impl Node for Branch {
    async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
        let taken = self
            .condition
            .eval_bool(&cx.scope())
            .map_err(|e| NodeError::fatal(format!("condition {e}")))?;
        Ok(Output::with_port(
            Value::Bool(taken),
            if taken { "true" } else { "false" },
        ))
    }

    fn ports(&self) -> &[&str] {
        &["true", "false"]
    }

    fn references(&self) -> References {
        self.condition.references()
    }
}

/// `template`: renders a template to a string.
struct TemplateNode {
    template: Template,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateParams {
    template: String,
}

pub(crate) fn template(params: &Value) -> Result<Box<dyn Node>, ParamError> {
    let p: TemplateParams = parse_params(params)?;
    let template =
        Template::compile(&p.template).map_err(|e| ParamError::new(format!("template: {e}")))?;
    Ok(Box::new(TemplateNode { template }))
}

#[async_trait]
impl Node for TemplateNode {
    async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
        let text = self
            .template
            .render_string(&cx.scope())
            .map_err(NodeError::fatal)?;
        Ok(Value::String(text).into())
    }

    fn references(&self) -> References {
        self.template.references()
    }
}

/// `noop`: outputs `null`.
struct Noop;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

pub(crate) fn noop(params: &Value) -> Result<Box<dyn Node>, ParamError> {
    let NoParams {} = parse_params(params)?;
    Ok(Box::new(Noop))
}

#[async_trait]
impl Node for Noop {
    async fn run(&self, _cx: &NodeContext) -> Result<Output, NodeError> {
        Ok(Value::Null.into())
    }
}
