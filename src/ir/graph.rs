//! The graph: nodes in a petgraph `StableDiGraph`, joined by tensor edges from the
//! node producing a tensor to each node consuming it.
//!
//! Tensors are named, as in ONNX. Node inputs and outputs hold the names; the
//! graph keeps the edges and two indexes (producer and uses of every name) in step
//! with them, so nodes are only ever changed through [`Graph::add_node`],
//! [`Graph::remove_node`] and [`Graph::update_node`].

use super::{AttrValue, Attribute, Extras, Tensor, ValueInfo};
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

pub type NodeId = NodeIndex;

/// An operator application.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    /// `""` is the default ONNX domain (`ai.onnx`).
    pub domain: String,
    /// Input tensor names; `""` marks an omitted optional input.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: Vec<Attribute>,
    pub extras: Extras,
}

impl Node {
    pub fn new(op_type: impl Into<String>, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            name: String::new(),
            op_type: op_type.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            attributes: Vec::new(),
            extras: Extras::default(),
        }
    }

    pub fn with_name(mut self, name: impl Into<String>) -> Node {
        self.name = name.into();
        self
    }

    pub fn with_domain(mut self, domain: impl Into<String>) -> Node {
        self.domain = domain.into();
        self
    }

    pub fn with_attr(mut self, name: impl Into<String>, value: AttrValue) -> Node {
        self.attributes.push(Attribute::new(name, value));
        self
    }

    pub fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.attributes.iter().find(|a| a.name == name).map(|a| &a.value)
    }

    pub fn attr_int(&self, name: &str) -> Option<i64> {
        match self.attr(name)? {
            AttrValue::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn attr_float(&self, name: &str) -> Option<f32> {
        match self.attr(name)? {
            AttrValue::Float(f) => Some(*f),
            _ => None,
        }
    }

    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        match self.attr(name)? {
            AttrValue::Ints(v) => Some(v),
            _ => None,
        }
    }

    /// The name options such as `--exclude` take for this node: its own, or,
    /// unnamed, its first output's.
    pub fn name_or_output(&self) -> &str {
        if self.name.is_empty() {
            self.outputs.first().map(String::as_str).unwrap_or("")
        } else {
            &self.name
        }
    }

    /// `true` for an op of the default ONNX domain with this type.
    pub fn is_onnx(&self, op_type: &str) -> bool {
        self.op_type == op_type && (self.domain.is_empty() || self.domain == "ai.onnx")
    }

    /// Names of the outer-scope tensors its subgraphs read (If/Loop/Scan bodies).
    pub fn captured_names(&self) -> HashSet<String> {
        let mut names = HashSet::new();
        for attr in &self.attributes {
            for g in attr.value.subgraphs() {
                g.collect_free_names(&mut names);
            }
        }
        names
    }

    /// `"Op"` or `"domain.Op"`.
    pub fn qualified_op(&self) -> String {
        if self.domain.is_empty() || self.domain == "ai.onnx" {
            self.op_type.clone()
        } else {
            format!("{}.{}", self.domain, self.op_type)
        }
    }
}

/// How a node uses a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// As its input number `i`.
    Input(usize),
    /// From inside one of its subgraphs.
    Captured,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Use {
    pub node: NodeId,
    pub slot: Slot,
}

/// Edge weight: the tensor flowing along it and where the consumer takes it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEdge {
    pub tensor: String,
    pub slot: Slot,
}

/// The graph has a cycle through these nodes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the graph has a cycle through node '{node_name}' ({op_type})")]
pub struct CycleError {
    pub node_name: String,
    pub op_type: String,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    dag: StableDiGraph<Node, TensorEdge>,
    producers: HashMap<String, (NodeId, usize)>,
    uses: HashMap<String, Vec<Use>>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub value_info: Vec<ValueInfo>,
    pub initializers: Vec<Tensor>,
    /// No node was removed since loading: index order is the file's order.
    in_file_order: bool,
    pub extras: Extras,
}

impl PartialEq for Graph {
    fn eq(&self, other: &Graph) -> bool {
        self.name == other.name
            && self.inputs == other.inputs
            && self.outputs == other.outputs
            && self.value_info == other.value_info
            && self.initializers == other.initializers
            && self.extras == other.extras
            && self.nodes().eq(other.nodes())
    }
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), in_file_order: true, ..Graph::default() }
    }

    pub fn node_count(&self) -> usize {
        self.dag.node_count()
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.dag.node_weight(id)
    }

    /// The petgraph view, for graph algorithms (read only).
    pub fn dag(&self) -> &StableDiGraph<Node, TensorEdge> {
        &self.dag
    }

    /// Adds a node and wires it to the producers and uses already in the graph.
    pub fn add_node(&mut self, node: Node) -> NodeId {
        let id = self.dag.add_node(node);
        self.wire(id);
        id
    }

    /// Removes a node; its consumers keep the names they read, now dangling until
    /// rewired ([`Graph::validate`] reports them).
    pub fn remove_node(&mut self, id: NodeId) -> Option<Node> {
        self.unwire(id);
        self.in_file_order = false;
        self.dag.remove_node(id)
    }

    /// Changes a node in place (inputs, outputs, attributes) and rewires it.
    pub fn update_node<R>(&mut self, id: NodeId, change: impl FnOnce(&mut Node) -> R) -> Option<R> {
        self.dag.node_weight(id)?;
        self.unwire(id);
        let result = self.dag.node_weight_mut(id).map(change);
        self.wire(id);
        // Rewired inputs may now come from a later node.
        self.in_file_order = false;
        result
    }

    /// Makes every node that reads `old` read `new` instead. Graph outputs are not
    /// changed: they are the model's interface.
    pub fn replace_uses(&mut self, old: &str, new: &str) {
        let uses: Vec<Use> = self.uses(old).to_vec();
        for u in uses {
            match u.slot {
                Slot::Input(i) => {
                    self.update_node(u.node, |n| n.inputs[i] = new.to_string());
                }
                Slot::Captured => {
                    self.update_node(u.node, |n| rename_in_subgraphs(n, old, new));
                }
            }
        }
    }

    /// The node producing `tensor`, and which of its outputs it is.
    pub fn producer(&self, tensor: &str) -> Option<(NodeId, usize)> {
        self.producers.get(tensor).copied()
    }

    /// The nodes reading `tensor`.
    pub fn uses(&self, tensor: &str) -> &[Use] {
        self.uses.get(tensor).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn initializer(&self, name: &str) -> Option<&Tensor> {
        self.initializers.iter().find(|t| t.name == name)
    }

    pub fn is_graph_output(&self, name: &str) -> bool {
        self.outputs.iter().any(|o| o.name == name)
    }

    /// Node ids in a topological order: the file's order while no node was removed
    /// or rewired and that order is topological, otherwise a topological sort that
    /// keeps earlier nodes first.
    pub fn node_ids(&self) -> Result<Vec<NodeId>, CycleError> {
        // Index order is the file's order; keep it whenever it is topological
        // (every edge runs forward), which a valid, unedited model's order is.
        if self.in_file_order && (&self.dag).edge_references().all(|e| e.source() < e.target()) {
            return Ok(self.dag.node_indices().collect());
        }
        let mut pending: HashMap<NodeId, usize> = self.dag.node_indices().map(|id| (id, self.dag.edges_directed(id, Direction::Incoming).count())).collect();
        let mut ready: BinaryHeap<Reverse<NodeId>> = pending.iter().filter(|(_, &n)| n == 0).map(|(&id, _)| Reverse(id)).collect();
        let mut order = Vec::with_capacity(pending.len());
        while let Some(Reverse(id)) = ready.pop() {
            order.push(id);
            for edge in self.dag.edges_directed(id, Direction::Outgoing) {
                let count = pending.get_mut(&edge.target()).expect("edge to a live node");
                *count -= 1;
                if *count == 0 {
                    ready.push(Reverse(edge.target()));
                }
            }
        }
        if order.len() < self.dag.node_count() {
            let stuck = self.dag.node_indices().find(|id| !order.contains(id)).expect("a node left");
            let node = &self.dag[stuck];
            return Err(CycleError { node_name: node.name.clone(), op_type: node.op_type.clone() });
        }
        Ok(order)
    }

    /// Nodes in topological order (file order for an unmodified graph). A graph
    /// with a cycle yields its nodes in index order; [`Graph::validate`] reports the cycle.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> + '_ {
        let ids = self.node_ids().unwrap_or_else(|_| self.dag.node_indices().collect());
        ids.into_iter().map(move |id| &self.dag[id])
    }

    /// Every node, with its id, in the order of [`Graph::nodes`].
    pub fn nodes_with_ids(&self) -> Vec<(NodeId, &Node)> {
        let ids = self.node_ids().unwrap_or_else(|_| self.dag.node_indices().collect());
        ids.into_iter().map(|id| (id, &self.dag[id])).collect()
    }

    /// `tensor` is computed by an `op` node within `hops` producers (through any input).
    pub fn computed_by(&self, tensor: &str, op: &str, hops: usize) -> bool {
        let Some(node) = self.producer(tensor).and_then(|(id, _)| self.node(id)) else { return false };
        node.op_type == op || (hops > 0 && node.inputs.iter().any(|i| self.computed_by(i, op, hops - 1)))
    }

    /// `node` compares two position ranges (`i <= j` between two Range-derived
    /// tensors): how exporters build a causal mask without Trilu.
    pub fn is_causal_comparison(&self, node: &Node) -> bool {
        matches!(node.op_type.as_str(), "LessOrEqual" | "Less" | "GreaterOrEqual" | "Greater")
            && node.inputs.len() == 2
            && node.inputs.iter().all(|i| self.computed_by(i, "Range", 4))
    }

    /// Names this graph reads but does not define: its outer-scope captures.
    pub fn collect_free_names(&self, free: &mut HashSet<String>) {
        let defined: HashSet<&str> = self
            .inputs
            .iter()
            .map(|v| v.name.as_str())
            .chain(self.initializers.iter().map(|t| t.name.as_str()))
            .chain(self.producers.keys().map(String::as_str))
            .collect();
        for node in self.dag.node_weights() {
            for input in node.inputs.iter().filter(|n| !n.is_empty()) {
                if !defined.contains(input.as_str()) {
                    free.insert(input.clone());
                }
            }
            for name in node.captured_names() {
                if !defined.contains(name.as_str()) {
                    free.insert(name);
                }
            }
        }
        for output in &self.outputs {
            if !defined.contains(output.name.as_str()) {
                free.insert(output.name.clone());
            }
        }
    }

    fn wire(&mut self, id: NodeId) {
        let node = &self.dag[id];
        let outputs: Vec<(usize, String)> = node.outputs.iter().cloned().enumerate().filter(|(_, n)| !n.is_empty()).collect();
        let mut reads: Vec<(String, Slot)> = node.inputs.iter().enumerate().filter(|(_, n)| !n.is_empty()).map(|(i, n)| (n.clone(), Slot::Input(i))).collect();
        let mut captured: Vec<String> = node.captured_names().into_iter().collect();
        captured.sort();
        reads.extend(captured.into_iter().map(|n| (n, Slot::Captured)));

        for (name, slot) in reads {
            if let Some(&(producer, _)) = self.producers.get(&name) {
                self.dag.add_edge(producer, id, TensorEdge { tensor: name.clone(), slot });
            }
            self.uses.entry(name).or_default().push(Use { node: id, slot });
        }
        for (index, name) in outputs {
            // A duplicate producer keeps the first; validate() reports the clash.
            if self.producers.contains_key(&name) {
                continue;
            }
            for u in self.uses.get(&name).cloned().unwrap_or_default() {
                self.dag.add_edge(id, u.node, TensorEdge { tensor: name.clone(), slot: u.slot });
            }
            self.producers.insert(name, (id, index));
        }
    }

    fn unwire(&mut self, id: NodeId) {
        let Some(node) = self.dag.node_weight(id) else { return };
        for name in node.outputs.iter().filter(|n| !n.is_empty()) {
            if self.producers.get(name).map(|p| p.0) == Some(id) {
                self.producers.remove(name);
            }
        }
        let mut read: Vec<String> = node.inputs.iter().filter(|n| !n.is_empty()).cloned().collect();
        read.extend(node.captured_names());
        for name in read {
            if let Some(list) = self.uses.get_mut(&name) {
                list.retain(|u| u.node != id);
                if list.is_empty() {
                    self.uses.remove(&name);
                }
            }
        }
        let edges: Vec<_> = self.dag.edges_directed(id, Direction::Incoming).chain(self.dag.edges_directed(id, Direction::Outgoing)).map(|e| e.id()).collect();
        for e in edges {
            self.dag.remove_edge(e);
        }
    }
}

/// Renames an outer-scope tensor wherever a node's subgraphs read it (a name the
/// subgraph defines itself shadows the outer one and is left alone).
fn rename_in_subgraphs(node: &mut Node, old: &str, new: &str) {
    for attr in &mut node.attributes {
        let graphs: &mut [Graph] = match &mut attr.value {
            AttrValue::Graph(g) => std::slice::from_mut(g.as_mut()),
            AttrValue::Graphs(gs) => gs,
            _ => continue,
        };
        for g in graphs {
            let mut free = HashSet::new();
            g.collect_free_names(&mut free);
            if !free.contains(old) {
                continue;
            }
            for o in g.outputs.iter_mut().filter(|o| o.name == old) {
                o.name = new.to_string();
            }
            let ids: Vec<NodeId> = g.dag.node_indices().collect();
            for id in ids {
                g.update_node(id, |n| {
                    for input in n.inputs.iter_mut().filter(|i| *i == old) {
                        *input = new.to_string();
                    }
                    rename_in_subgraphs(n, old, new);
                });
            }
        }
    }
}
