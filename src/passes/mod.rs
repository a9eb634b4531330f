//! Graph-to-graph passes. Each takes a model (plus data where needed) and returns a new model
//! and a report; passes compose in any order and the result can be exported at any point.
