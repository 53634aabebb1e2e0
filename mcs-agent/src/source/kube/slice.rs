//! What the Kubernetes source keeps of an EndpointSlice: the fields the
//! agent reads, deserialized straight from the API's answers. A whole
//! `k8s-openapi` EndpointSlice, even pruned, held 5 KiB for ten endpoints
//! (each endpoint has room for a target reference, hints, a hostname and
//! more, present or not); this keeps about a third of that.

use std::borrow::Cow;

use k8s_openapi::{
    NamespaceResourceScope,
    api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, Deserializer};

/// An EndpointSlice as the source stores it: what [`crate::desired::SliceEntry`]
/// reads, and nothing else.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredSlice {
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Missing, it is reported by the slice's check (as the whole type did).
    #[serde(default)]
    pub address_type: String,
    #[serde(default)]
    pub ports: Option<Vec<EndpointPort>>,
    /// The API sends a slice without endpoints (a service scaled to zero) as
    /// `"endpoints": null`: its Go field has no `omitempty`.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub endpoints: Vec<StoredEndpoint>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredEndpoint {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub node_name: Option<String>,
}

/// A list that may be absent or `null`: empty either way.
fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

impl StoredSlice {
    /// The slice as the checks read it (built only when a slice changed:
    /// unchanged ones keep their checked entry).
    pub fn to_slice(&self) -> EndpointSlice {
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| Endpoint {
                addresses: e.addresses.clone(),
                conditions: e.conditions.clone(),
                zone: e.zone.clone(),
                node_name: e.node_name.clone(),
                ..Endpoint::default()
            })
            .collect();
        EndpointSlice {
            metadata: self.metadata.clone(),
            address_type: self.address_type.clone(),
            ports: self.ports.clone(),
            endpoints,
        }
    }
}

impl kube::Resource for StoredSlice {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "EndpointSlice".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "discovery.k8s.io".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "endpointslices".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
