//! ONNX import/export: round trips of the shared models, external data, and malformed input
//! that must give one-line errors instead of panics.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lithe::ir::{Attr, DType, Dim, Model, Tensor, TensorData};
use lithe::onnx::proto::attribute_proto::AttributeType;
use lithe::onnx::proto::tensor_proto::DataLocation;
use lithe::onnx::proto::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use lithe::onnx::{
    decode_model, encode_model, load_model, load_tensor_pb, save_model, save_tensor_pb,
    ExternalData, SaveOptions, EXTERNAL_ALIGN,
};
use lithe::Error;
use prost::Message;

// ---------------------------------------------------------------- helpers

fn shared_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("LITHE_SHARED") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    };
    dir.join("models").is_dir().then_some(dir)
}

fn shared_model(name: &str) -> Option<PathBuf> {
    let Some(dir) = shared_dir() else {
        eprintln!("note: shared folder not found (set LITHE_SHARED); skipping {name}");
        return None;
    };
    let p = dir.join("models").join(name);
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("note: {} is absent; skipping", p.display());
        None
    }
}

/// A scratch folder removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "lithe-onnx-io-{}-{tag}-{nanos}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn assert_one_line(err: &Error) {
    let s = err.to_string();
    assert!(!s.contains('\n'), "multi-line error: {s:?}");
    assert!(!s.is_empty());
}

fn decode(bytes: &[u8]) -> lithe::Result<Model> {
    decode_model(bytes, None, Path::new("test.onnx"))
}

fn tensor_type(elem: i32, dims: &[i64]) -> TypeProto {
    TypeProto {
        denotation: None,
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: Some(elem),
            shape: Some(TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|&d| lithe::onnx::proto::tensor_shape_proto::Dimension {
                        denotation: None,
                        value: Some(
                            lithe::onnx::proto::tensor_shape_proto::dimension::Value::DimValue(d),
                        ),
                    })
                    .collect(),
            }),
        })),
    }
}

fn value_info(name: &str, elem: i32, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(tensor_type(elem, dims)),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("{op}_{}", outputs.first().copied().unwrap_or(""))),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn f32_raw(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(1),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// `y = Add(x, w)` over the given initializers, as serialized bytes.
fn tiny_model(initializers: Vec<TensorProto>, extra_nodes: Vec<NodeProto>) -> ModelProto {
    let mut nodes = extra_nodes;
    nodes.push(node("Add", &["x", "w"], &["y"]));
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: nodes,
            initializer: initializers,
            input: vec![value_info("x", 1, &[2])],
            output: vec![value_info("y", 1, &[2])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn external_tensor(name: &str, dims: &[i64], entries: &[(&str, &str)]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(1),
        data_location: Some(DataLocation::External as i32),
        external_data: entries
            .iter()
            .map(|(k, v)| StringStringEntryProto {
                key: Some(k.to_string()),
                value: Some(v.to_string()),
            })
            .collect(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------- round trips

fn round_trip(name: &str) {
    let Some(path) = shared_model(name) else {
        return;
    };
    let model = load_model(&path).unwrap();
    assert!(!model.graph.nodes.is_empty());
    let bytes = encode_model(&model).unwrap();
    let again = decode(&bytes).unwrap();
    assert!(again == model, "{name}: model changed in a round trip");

    let dir = TempDir::new(name);
    let out = dir.path().join(name);
    save_model(&model, &out, &SaveOptions::default()).unwrap();
    let reloaded = load_model(&out).unwrap();
    assert!(reloaded == model, "{name}: model changed through a file");
    // Exactly one file: atomic writes leave no temporaries, small models need no .data.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn round_trip_mnist_cnn() {
    round_trip("mnist_cnn.onnx");
}

#[test]
fn round_trip_pplcnet_orientation() {
    round_trip("pplcnet_orientation.onnx");
}

#[test]
fn round_trip_minilm_l6_v2() {
    round_trip("minilm_l6_v2.onnx");
}

#[test]
fn imports_metadata_and_symbolic_dims() {
    if let Some(path) = shared_model("pplcnet_orientation.onnx") {
        let m = load_model(&path).unwrap();
        assert_eq!(m.metadata_value("character"), Some("0\n90\n180\n270"));
        assert_eq!(m.opset(), 15);
        let x = &m.graph.inputs[0];
        assert_eq!(x.ty.dtype, DType::F32);
        assert_eq!(
            x.ty.shape.as_deref(),
            Some(
                &[
                    Dim::Sym("DynamicDimension.0".into()),
                    Dim::Known(3),
                    Dim::Known(224),
                    Dim::Known(224)
                ][..]
            )
        );
    }
    if let Some(path) = shared_model("minilm_l6_v2.onnx") {
        let m = load_model(&path).unwrap();
        assert_eq!(m.ir_version, 7);
        assert_eq!(m.graph.inputs.len(), 3);
        // Constant nodes were folded into initializers.
        assert!(m.graph.nodes.iter().all(|n| n.op_type != "Constant"));
        assert!(m.graph.initializers.len() > 101);
    }
}

#[test]
fn external_data_always_round_trips() {
    let Some(path) = shared_model("mnist_cnn.onnx") else {
        return;
    };
    let model = load_model(&path).unwrap();
    let dir = TempDir::new("external");
    let out = dir.path().join("mnist.onnx");
    let opts = SaveOptions {
        external_data: ExternalData::Always,
    };
    save_model(&model, &out, &opts).unwrap();
    let data = dir.path().join("mnist.onnx.data");
    assert!(data.is_file());
    assert!(fs::metadata(&out).unwrap().len() < 100_000);
    let reloaded = load_model(&out).unwrap();
    assert!(reloaded == model);

    // Offsets are page aligned and every large initializer is external.
    let proto = ModelProto::decode(fs::read(&out).unwrap().as_slice()).unwrap();
    let graph = proto.graph.unwrap();
    let external: Vec<_> = graph
        .initializer
        .iter()
        .filter(|t| t.data_location == Some(DataLocation::External as i32))
        .collect();
    assert!(!external.is_empty());
    for t in external {
        let offset: u64 = t
            .external_data
            .iter()
            .find(|e| e.key() == "offset")
            .unwrap()
            .value()
            .parse()
            .unwrap();
        assert_eq!(offset % EXTERNAL_ALIGN, 0);
    }
    // Auto with a tiny threshold also externalizes; saving again replaces files atomically.
    let opts = SaveOptions {
        external_data: ExternalData::Auto { threshold_bytes: 1 },
    };
    save_model(&model, &out, &opts).unwrap();
    assert!(load_model(&out).unwrap() == model);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn small_model_every_dtype_and_attribute_round_trips() {
    let mut model =
        decode(&tiny_model(vec![f32_raw("w", &[2], &[1.0, -2.0])], vec![]).encode_to_vec())
            .unwrap();
    let g = &mut model.graph;
    let tensors = [
        Tensor::new(vec![2], TensorData::F16(vec![0x3c00, 0xc000])).unwrap(),
        Tensor::new(vec![1, 2], TensorData::F64(vec![1.5, -0.25])).unwrap(),
        Tensor::new(vec![3], TensorData::I8(vec![-128, 0, 127])).unwrap(),
        Tensor::new(vec![2], TensorData::U8(vec![0, 255])).unwrap(),
        Tensor::new(vec![2], TensorData::I16(vec![-300, 300])).unwrap(),
        Tensor::new(vec![2], TensorData::I32(vec![i32::MIN, i32::MAX])).unwrap(),
        Tensor::new(vec![], TensorData::I64(vec![i64::MIN])).unwrap(),
        Tensor::new(vec![2], TensorData::Bool(vec![true, false])).unwrap(),
        Tensor::new(vec![0, 3], TensorData::F32(vec![])).unwrap(),
    ];
    for (i, t) in tensors.into_iter().enumerate() {
        g.initializers.insert(format!("c{i}"), t);
    }
    let add = &mut g.nodes[0];
    add.doc_string = "adds".into();
    add.attrs.insert("f".into(), Attr::Float(0.5));
    add.attrs.insert("i".into(), Attr::Int(-3));
    add.attrs.insert("s".into(), Attr::String("héllo".into()));
    add.attrs.insert("fs".into(), Attr::Floats(vec![1.0, 2.0]));
    add.attrs.insert("is".into(), Attr::Ints(vec![]));
    add.attrs
        .insert("ss".into(), Attr::Strings(vec!["a".into(), "".into()]));
    add.attrs
        .insert("t".into(), Attr::Tensor(Tensor::scalar_f32(3.0)));
    g.value_info.insert(
        "y".into(),
        lithe::ir::TypeInfo::new(DType::F32, vec![Dim::Unknown, Dim::Sym("n".into())]),
    );
    g.outputs[0].doc_string = "the sum".into();
    model.doc_string = "doc".into();
    model.domain = "test.domain".into();
    model.model_version = 3;
    model.producer_name = "p".into();
    model.producer_version = "1".into();
    model.metadata = vec![("b".into(), "2".into()), ("a".into(), "1".into())];

    let again = decode(&encode_model(&model).unwrap()).unwrap();
    assert_eq!(again, model);

    let dir = TempDir::new("dtypes");
    let out = dir.path().join("m.onnx");
    let opts = SaveOptions {
        external_data: ExternalData::Always,
    };
    save_model(&model, &out, &opts).unwrap();
    assert_eq!(load_model(&out).unwrap(), model);
}

#[test]
fn constant_nodes_become_initializers() {
    let mut c = node("Constant", &[], &["w"]);
    c.attribute.push(AttributeProto {
        name: Some("value_floats".into()),
        r#type: Some(AttributeType::Floats as i32),
        floats: vec![1.0, 2.0],
        ..Default::default()
    });
    let mut ci = node("Constant", &[], &["k"]);
    ci.attribute.push(AttributeProto {
        name: Some("value_int".into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(7),
        ..Default::default()
    });
    let mut ct = node("Constant", &[], &["t"]);
    ct.attribute.push(AttributeProto {
        name: Some("value".into()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(f32_raw("", &[1], &[4.0])),
        ..Default::default()
    });
    // Consumers before producers: import must reorder.
    let nodes = vec![node("Mul", &["t", "k"], &["u"]), ct, ci, c];
    let bytes = tiny_model(vec![], nodes).encode_to_vec();
    let m = decode(&bytes).unwrap();
    let g = &m.graph;
    assert_eq!(g.nodes.len(), 2);
    assert_eq!(g.initializers["w"].as_f32().unwrap(), &[1.0, 2.0]);
    assert_eq!(g.initializers["k"].as_i64().unwrap(), &[7]);
    assert_eq!(g.initializers["k"].shape(), &[] as &[usize]);
    assert_eq!(g.initializers["t"].as_f32().unwrap(), &[4.0]);
    assert_eq!(g.nodes[0].name, "Mul_u");
}

#[test]
fn input_with_initializer_is_a_constant() {
    let mut p = tiny_model(vec![f32_raw("w", &[2], &[1.0, 2.0])], vec![]);
    let g = p.graph.as_mut().unwrap();
    g.input.push(value_info("w", 1, &[2]));
    let m = decode(&p.encode_to_vec()).unwrap();
    assert_eq!(m.graph.inputs.len(), 1);
    assert!(m.graph.initializers.contains_key("w"));
    // IR version 3 requires initializers among the inputs; export restores that.
    let mut old = m.clone();
    old.ir_version = 3;
    let p2 = ModelProto::decode(encode_model(&old).unwrap().as_slice()).unwrap();
    assert_eq!(p2.graph.unwrap().input.len(), 2);
    assert_eq!(decode(&encode_model(&old).unwrap()).unwrap(), old);
}

#[test]
fn typed_fields_decode() {
    let mk = |name: &str, dt: i32, dims: &[i64]| TensorProto {
        name: Some(name.into()),
        data_type: Some(dt),
        dims: dims.to_vec(),
        ..Default::default()
    };
    let mut f = mk("f", 1, &[2]);
    f.float_data = vec![1.0, 2.0];
    let mut h = mk("h", 10, &[1]);
    h.int32_data = vec![0x3c00];
    let mut b = mk("b", 9, &[2]);
    b.int32_data = vec![0, 1];
    let mut i8t = mk("i8", 3, &[1]);
    i8t.int32_data = vec![-5];
    let mut l = mk("l", 7, &[1]);
    l.int64_data = vec![1 << 40];
    let mut d = mk("d", 11, &[1]);
    d.double_data = vec![0.5];
    let m = decode(
        &tiny_model(
            vec![f32_raw("w", &[2], &[0.0; 2]), f, h, b, i8t, l, d],
            vec![],
        )
        .encode_to_vec(),
    )
    .unwrap();
    let init = &m.graph.initializers;
    assert_eq!(init["f"].as_f32().unwrap(), &[1.0, 2.0]);
    assert_eq!(init["h"].data(), &TensorData::F16(vec![0x3c00]));
    assert_eq!(init["b"].data(), &TensorData::Bool(vec![false, true]));
    assert_eq!(init["i8"].data(), &TensorData::I8(vec![-5]));
    assert_eq!(init["l"].as_i64().unwrap(), &[1 << 40]);
    assert_eq!(init["d"].data(), &TensorData::F64(vec![0.5]));
}

#[test]
fn tensor_pb_files() {
    let dir = TempDir::new("pb");
    let p = dir.path().join("input_0.pb");
    let t = Tensor::from_f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
    save_tensor_pb(&p, "x", &t).unwrap();
    let (name, back) = load_tensor_pb(&p).unwrap();
    assert_eq!(name, "x");
    assert_eq!(back, t);
    fs::write(&p, [0x0a, 0xff]).unwrap();
    let e = load_tensor_pb(&p).unwrap_err();
    assert!(matches!(e, Error::Decode { .. }), "{e}");
    assert_one_line(&e);
}

// ---------------------------------------------------------------- bad input

fn expect_err(bytes: &[u8], needles: &[&str]) -> Error {
    let e = decode(bytes).expect_err("malformed model was accepted");
    assert_one_line(&e);
    let s = e.to_string();
    for n in needles {
        assert!(s.contains(n), "{s:?} should mention {n:?}");
    }
    e
}

#[test]
fn truncated_files_are_decode_errors() {
    let Some(path) = shared_model("mnist_cnn.onnx") else {
        return;
    };
    let bytes = fs::read(path).unwrap();
    let n = bytes.len();
    for cut in [0, 1, 2, 7, 33, 100, 1000, n / 4, n / 2, 3 * n / 4, n - 100] {
        let e = expect_err(&bytes[..cut], &["test.onnx"]);
        assert!(matches!(e, Error::Decode { .. }), "cut {cut}: {e}");
    }
}

#[test]
fn random_bytes_are_errors() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for len in [1, 2, 3, 10, 100, 1000, 100_000] {
        for _ in 0..5 {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let r = catch_unwind(|| decode(&bytes));
            let e = r
                .expect("decoder panicked")
                .expect_err("random bytes accepted");
            assert_one_line(&e);
        }
    }
}

#[test]
fn wrong_wire_types_are_decode_errors() {
    // graph (field 7) sent as a varint instead of a message.
    let e = expect_err(&[0x08, 0x08, 0x38, 0x01], &["test.onnx"]);
    assert!(matches!(e, Error::Decode { .. }), "{e}");
    // ir_version (field 1) sent as a length-delimited field.
    let e = expect_err(&[0x0a, 0x01, 0x00], &[]);
    assert!(matches!(e, Error::Decode { .. }), "{e}");
    // A message field whose declared length runs past the end of the buffer.
    let e = expect_err(&[0x3a, 0xff, 0xff, 0xff, 0xff, 0x07, 0x00], &[]);
    assert!(matches!(e, Error::Decode { .. }), "{e}");
}

#[test]
fn bad_dims_are_errors_naming_the_tensor() {
    let mut t = f32_raw("huge", &[i64::MAX, i64::MAX], &[0.0]);
    expect_err(
        &tiny_model(vec![f32_raw("w", &[2], &[0.0; 2]), t.clone()], vec![]).encode_to_vec(),
        &["huge", "overflow"],
    );
    t.dims = vec![1 << 32, 2];
    expect_err(
        &tiny_model(vec![f32_raw("w", &[2], &[0.0; 2]), t.clone()], vec![]).encode_to_vec(),
        &["huge", "byte limit"],
    );
    t.dims = vec![2, -1];
    expect_err(
        &tiny_model(vec![f32_raw("w", &[2], &[0.0; 2]), t.clone()], vec![]).encode_to_vec(),
        &["huge", "negative"],
    );
    // Element count that does not match the data.
    t.dims = vec![3];
    expect_err(
        &tiny_model(vec![f32_raw("w", &[2], &[0.0; 2]), t.clone()], vec![]).encode_to_vec(),
        &["huge", "raw_data"],
    );
    let mut typed = TensorProto {
        name: Some("typed".into()),
        data_type: Some(7),
        dims: vec![1 << 30],
        int64_data: vec![1, 2],
        ..Default::default()
    };
    expect_err(
        &tiny_model(vec![f32_raw("w", &[2], &[0.0; 2]), typed.clone()], vec![]).encode_to_vec(),
        &["typed", "int64_data"],
    );
    typed.dims = vec![2];
    typed.data_type = Some(6);
    expect_err(
        &tiny_model(vec![f32_raw("w", &[2], &[0.0; 2]), typed], vec![]).encode_to_vec(),
        &["typed", "int32_data"],
    );
}

#[test]
fn unsupported_types_name_tensor_and_type() {
    for (code, name) in [
        (8, "STRING"),
        (16, "BFLOAT16"),
        (12, "UINT32"),
        (17, "FLOAT8E4M3FN"),
        (22, "INT4"),
        (14, "COMPLEX64"),
    ] {
        let t = TensorProto {
            name: Some("odd".into()),
            data_type: Some(code),
            dims: vec![1],
            raw_data: Some(vec![0; 8].into()),
            ..Default::default()
        };
        expect_err(
            &tiny_model(vec![f32_raw("w", &[2], &[0.0; 2]), t], vec![]).encode_to_vec(),
            &["odd", name],
        );
    }
    let mut p = tiny_model(vec![f32_raw("w", &[2], &[0.0; 2])], vec![]);
    p.graph.as_mut().unwrap().input[0] = value_info("x", 8, &[2]);
    expect_err(&p.encode_to_vec(), &["'x'", "STRING"]);
}

#[test]
fn unsupported_graph_features_name_the_node() {
    let w = || vec![f32_raw("w", &[2], &[0.0; 2])];
    let mut if_node = node("If", &["x"], &["z"]);
    if_node.attribute.push(AttributeProto {
        name: Some("then_branch".into()),
        r#type: Some(AttributeType::Graph as i32),
        g: Some(GraphProto::default()),
        ..Default::default()
    });
    expect_err(
        &tiny_model(w(), vec![if_node.clone()]).encode_to_vec(),
        &["If_z", "subgraph"],
    );
    if_node.op_type = Some("MyOp".into());
    if_node.domain = Some("custom".into());
    expect_err(
        &tiny_model(w(), vec![if_node]).encode_to_vec(),
        &["If_z", "then_branch", "graph"],
    );

    let mut sparse = node("Constant", &[], &["s"]);
    sparse.attribute.push(AttributeProto {
        name: Some("sparse_value".into()),
        r#type: Some(AttributeType::SparseTensor as i32),
        ..Default::default()
    });
    expect_err(
        &tiny_model(w(), vec![sparse]).encode_to_vec(),
        &["Constant_s", "sparse_value"],
    );

    // A value nobody produces, a cycle, a double definition, an unproduced output.
    expect_err(
        &tiny_model(w(), vec![node("Relu", &["nope"], &["r"])]).encode_to_vec(),
        &["nope"],
    );
    let cycle = vec![node("Relu", &["b"], &["a"]), node("Relu", &["a"], &["b"])];
    expect_err(&tiny_model(w(), cycle).encode_to_vec(), &["cycle"]);
    expect_err(
        &tiny_model(w(), vec![node("Relu", &["x"], &["y"])]).encode_to_vec(),
        &["'y'", "more than once"],
    );
    let mut p = tiny_model(w(), vec![]);
    p.graph
        .as_mut()
        .unwrap()
        .output
        .push(value_info("ghost", 1, &[1]));
    expect_err(&p.encode_to_vec(), &["ghost"]);
    // No graph at all.
    expect_err(&ModelProto::default().encode_to_vec(), &["no graph"]);
}

#[test]
fn external_data_is_confined_to_the_model_folder() {
    let root = TempDir::new("confine");
    let model_dir = root.path().join("model");
    fs::create_dir_all(model_dir.join("sub")).unwrap();
    let payload: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(root.path().join("outside.bin"), &payload).unwrap();
    fs::write(model_dir.join("sub/inside.bin"), &payload).unwrap();

    let load = |entries: &[(&str, &str)]| {
        let p = tiny_model(vec![external_tensor("w", &[2], entries)], vec![]);
        let path = model_dir.join("m.onnx");
        fs::write(&path, p.encode_to_vec()).unwrap();
        load_model(&path)
    };
    let m = load(&[("location", "sub/inside.bin")]).unwrap();
    assert_eq!(m.graph.initializers["w"].as_f32().unwrap(), &[1.0, 2.0]);
    let m = load(&[
        ("location", "sub/inside.bin"),
        ("offset", "4"),
        ("length", "4"),
    ]);
    assert!(m.unwrap_err().to_string().contains("length"));

    let outside = root.path().join("outside.bin");
    let abs = outside.to_str().unwrap();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("location", "../outside.bin")], ".."),
        (vec![("location", "sub/../../outside.bin")], ".."),
        (vec![("location", abs)], "absolute"),
        (vec![("location", "missing.bin")], "missing.bin"),
        (
            vec![("location", "sub/inside.bin"), ("offset", "9")],
            "beyond the end",
        ),
        (
            vec![
                ("location", "sub/inside.bin"),
                ("offset", "4"),
                ("length", "8"),
            ],
            "beyond the end",
        ),
        (
            vec![
                ("location", "sub/inside.bin"),
                ("offset", "18446744073709551615"),
                ("length", "8"),
            ],
            "beyond",
        ),
        (
            vec![("location", "sub/inside.bin"), ("offset", "-1")],
            "offset",
        ),
        (vec![("location", "sub")], "regular file"),
        (vec![("offset", "0")], "location"),
    ];
    for (entries, needle) in cases {
        let e = load(&entries).expect_err("bad external data accepted");
        assert!(matches!(e, Error::ExternalData { .. }), "{e}");
        let s = e.to_string();
        assert_one_line(&e);
        assert!(
            s.contains("'w'") && s.contains(needle),
            "{s:?} should mention {needle:?}"
        );
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&outside, model_dir.join("link.bin")).unwrap();
        let e = load(&[("location", "link.bin")]).unwrap_err();
        assert!(e.to_string().contains("outside the model folder"), "{e}");
        std::os::unix::fs::symlink(root.path(), model_dir.join("up")).unwrap();
        let e = load(&[("location", "up/outside.bin")]).unwrap_err();
        assert!(e.to_string().contains("outside the model folder"), "{e}");
    }
    // Decoding from memory has no folder to read from.
    let p = tiny_model(
        vec![external_tensor(
            "w",
            &[2],
            &[("location", "sub/inside.bin")],
        )],
        vec![],
    );
    let e = decode(&p.encode_to_vec()).unwrap_err();
    assert!(matches!(e, Error::ExternalData { .. }), "{e}");
}

#[test]
fn fuzzed_mutations_never_panic() {
    let Some(path) = shared_model("mnist_cnn.onnx") else {
        return;
    };
    let original = fs::read(path).unwrap();
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let start = Instant::now();
    let mut iterations = 0;
    let mut accepted = 0;
    while iterations < 2000 && start.elapsed() < Duration::from_secs(5) {
        let mut bytes = original.clone();
        for _ in 0..1 + rng.below(4) {
            // Mutations in the first few KB hit structure (graph, nodes, shapes) rather
            // than weight bytes, which any value decodes.
            let hot = rng.below(4) != 0;
            let span = if hot {
                bytes.len().min(4096)
            } else {
                bytes.len()
            };
            let at = rng.below(span);
            match rng.below(4) {
                0 => bytes[at] ^= 1 << rng.below(8),
                1 => bytes[at] = rng.next() as u8,
                2 => bytes.truncate(at),
                _ => {
                    let n = 1 + rng.below(8);
                    let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                    bytes.splice(at..at, ins);
                }
            }
            if bytes.is_empty() {
                break;
            }
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            let r = decode(&bytes);
            if let Ok(m) = &r {
                // Whatever was accepted must also export.
                let _ = encode_model(m);
            }
            r.map(|_| ())
        }));
        match result {
            Err(_) => panic!("decoder panicked on mutation {iterations}"),
            Ok(Ok(())) => accepted += 1,
            Ok(Err(e)) => assert_one_line(&e),
        }
        iterations += 1;
    }
    eprintln!("fuzz: {iterations} mutations, {accepted} still decoded");
    assert!(iterations > 0);
}

#[test]
fn names_with_newlines_still_give_one_line_errors() {
    let mut n = node("Relu", &["no\nsuch"], &["r\n"]);
    n.name = Some("multi\nline".into());
    let e = expect_err(
        &tiny_model(vec![f32_raw("w", &[2], &[0.0; 2])], vec![n]).encode_to_vec(),
        &["multi\\nline"],
    );
    assert!(matches!(e, Error::Graph(_)), "{e}");
}

#[test]
fn saving_into_a_missing_folder_is_an_io_error() {
    let dir = TempDir::new("missing");
    let model =
        decode(&tiny_model(vec![f32_raw("w", &[2], &[0.0; 2])], vec![]).encode_to_vec()).unwrap();
    let e = save_model(
        &model,
        &dir.path().join("nope/m.onnx"),
        &SaveOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(save_model(&model, Path::new("/"), &SaveOptions::default()).is_err());
    // Nothing half-written is left behind in the folder that does exist.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}
