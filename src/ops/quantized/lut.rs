//! Integer kernels that stand in for a `DequantizeLinear -> f32 ops -> QuantizeLinear` chain
//! of the runtime plan (found by `crate::runtime::qfuse`), on 8-bit codes:
//! - [`CodeTable`] / [`LutKernel`]: an elementwise chain maps each of the 256 input codes to
//!   one output code, so the whole chain is a table lookup;
//! - [`MaxPoolLutKernel`]: a max pool right after the dequantization pools the codes
//!   themselves, then maps them through the table. Dequantization is monotone non-decreasing,
//!   so the largest code of a window dequantizes to the largest value of the window.
//!
//! The tables are not derived from formulas: the planner fills them by running the unfused
//! kernels on all 256 codes, which makes the fused results bit-identical by construction.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ir::{checked_numel, DType, Node, Tensor, TensorData};
use crate::kernels::pool::{Pool2dGeom, PoolKind};
use crate::kernels::pool_codes::{max_2x2_planes, CodeOrder};
use crate::ops::nn::PoolWindow;
use crate::ops::{node_error, required, Kernel, RunCtx};

/// Elements below which a table lookup stays on one thread.
const PAR_MIN_LUT: usize = 1 << 16;
/// Input elements below which pooling stays on one thread.
const PAR_MIN_POOL: usize = 1 << 15;

/// An 8-bit quantized element type, addressed by its bit pattern.
trait Code: Copy + Ord + Send + Sync + 'static {
    const ORDER: CodeOrder;
    fn bits(self) -> u8;
    fn from_bits(b: u8) -> Self;
    fn slice(data: &TensorData) -> Option<&[Self]>;
    fn wrap(v: Vec<Self>) -> TensorData;
}

impl Code for u8 {
    const ORDER: CodeOrder = CodeOrder::Unsigned;
    fn bits(self) -> u8 {
        self
    }
    fn from_bits(b: u8) -> u8 {
        b
    }
    fn slice(data: &TensorData) -> Option<&[u8]> {
        match data {
            TensorData::U8(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(v: Vec<u8>) -> TensorData {
        TensorData::U8(v)
    }
}

impl Code for i8 {
    const ORDER: CodeOrder = CodeOrder::Signed;
    fn bits(self) -> u8 {
        self as u8
    }
    fn from_bits(b: u8) -> i8 {
        b as i8
    }
    fn slice(data: &TensorData) -> Option<&[i8]> {
        match data {
            TensorData::I8(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(v: Vec<i8>) -> TensorData {
        TensorData::I8(v)
    }
}

fn is_code_type(dt: DType) -> bool {
    matches!(dt, DType::U8 | DType::I8)
}

/// A map from every code of an 8-bit input type to a code of an 8-bit output type.
#[derive(Clone, Debug, PartialEq)]
pub struct CodeTable {
    input: DType,
    output: DType,
    /// Output bit pattern, indexed by input bit pattern.
    map: [u8; 256],
}

impl CodeTable {
    /// Every code of `input` (u8 or i8) once, as a 1-D tensor ordered by bit pattern: the
    /// tensor to run the unfused chain on.
    pub fn all_codes(input: DType) -> Result<Tensor> {
        let data = match input {
            DType::U8 => TensorData::U8((0..=255).collect()),
            DType::I8 => TensorData::I8((0..=255u8).map(|b| b as i8).collect()),
            other => {
                return Err(Error::DType(format!(
                    "a code table needs u8 or i8 input, got {other}"
                )))
            }
        };
        Tensor::new(vec![256], data)
    }

    /// The table whose entry `b` is `mapped`'s element `b`, where `mapped` is what the chain
    /// made of [`CodeTable::all_codes`]`(input)`.
    pub fn from_outputs(input: DType, mapped: &Tensor) -> Result<CodeTable> {
        if !is_code_type(input) {
            return Err(Error::DType(format!(
                "a code table needs u8 or i8 input, got {input}"
            )));
        }
        if mapped.numel() != 256 {
            return Err(Error::Shape(format!(
                "a code table needs 256 outputs, got {}",
                mapped.numel()
            )));
        }
        let bits: Vec<u8> = match mapped.data() {
            TensorData::U8(v) => v.clone(),
            TensorData::I8(v) => v.iter().map(|&c| c as u8).collect(),
            other => {
                return Err(Error::DType(format!(
                    "a code table needs u8 or i8 output, got {}",
                    other.dtype()
                )))
            }
        };
        let mut map = [0u8; 256];
        map.copy_from_slice(&bits);
        Ok(CodeTable {
            input,
            output: mapped.dtype(),
            map,
        })
    }

    pub fn input(&self) -> DType {
        self.input
    }

    pub fn output(&self) -> DType {
        self.output
    }

    /// True when every code maps to itself (same type, same parameters on both sides).
    pub fn is_identity(&self) -> bool {
        self.input == self.output && self.map.iter().enumerate().all(|(i, &b)| i == b as usize)
    }

    #[inline(always)]
    fn get<I: Code, O: Code>(&self, c: I) -> O {
        O::from_bits(self.map[c.bits() as usize])
    }

    fn map_into<I: Code, O: Code>(&self, src: &[I], dst: &mut [O]) {
        let each = |(d, s): (&mut [O], &[I])| lookup(&self.map, bytes(s), bytes_mut(d));
        if crate::kernels::par::threads() > 1 && src.len() >= PAR_MIN_LUT {
            dst.par_chunks_mut(PAR_MIN_LUT)
                .zip(src.par_chunks(PAR_MIN_LUT))
                .for_each(each);
        } else {
            each((dst, src));
        }
    }

    /// Maps a whole tensor of input codes.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let shape = x.shape().to_vec();
        fn go<I: Code, O: Code>(t: &CodeTable, src: &[I], shape: Vec<usize>) -> Result<Tensor> {
            let mut out = vec![O::from_bits(0); src.len()];
            t.map_into(src, &mut out);
            Tensor::new(shape, O::wrap(out))
        }
        match (x.data(), self.output) {
            (TensorData::U8(v), DType::U8) => go::<u8, u8>(self, v, shape),
            (TensorData::U8(v), _) => go::<u8, i8>(self, v, shape),
            (TensorData::I8(v), DType::U8) => go::<i8, u8>(self, v, shape),
            (TensorData::I8(v), _) => go::<i8, i8>(self, v, shape),
            (other, _) => Err(Error::DType(format!(
                "expected {} codes, got {}",
                self.input,
                other.dtype()
            ))),
        }
    }

    /// Maps codes in place when input and output share a type.
    fn apply_in_place(&self, data: &mut TensorData) -> bool {
        match (data, self.output) {
            (TensorData::U8(v), DType::U8) => self.map_in_place(v),
            (TensorData::I8(v), DType::I8) => self.map_in_place(v),
            _ => return false,
        }
        true
    }

    fn map_in_place<C: Code>(&self, v: &mut [C]) {
        let each = |d: &mut [C]| lookup_in_place(&self.map, bytes_mut(d));
        if crate::kernels::par::threads() > 1 && v.len() >= PAR_MIN_LUT {
            v.par_chunks_mut(PAR_MIN_LUT).for_each(each);
        } else {
            each(v);
        }
    }
}

/// The bit patterns of 8-bit codes.
fn bytes<C: Code>(v: &[C]) -> &[u8] {
    const { assert!(std::mem::size_of::<C>() == 1) };
    // SAFETY: `C` is one byte (checked above) with every bit pattern valid (u8 or i8).
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len()) }
}

fn bytes_mut<C: Code>(v: &mut [C]) -> &mut [u8] {
    const { assert!(std::mem::size_of::<C>() == 1) };
    // SAFETY: as in `bytes`; every byte written is a valid `C`.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len()) }
}

/// Whether the 64-byte table lookup can run (AVX-512 VBMI's two-table byte permute).
fn vbmi_lookup() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::kernels::simd::has_avx512() && std::is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the 32-byte AVX2 table lookup can run.
fn avx2_lookup() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst[i] = map[src[i]]`.
fn lookup(map: &[u8; 256], src: &[u8], dst: &mut [u8]) {
    let len = src.len().min(dst.len());
    #[cfg(target_arch = "x86_64")]
    if vbmi_lookup() {
        // SAFETY: the features were detected just above; both pointers cover `len` bytes.
        unsafe { lookup_vbmi(map, src.as_ptr(), dst.as_mut_ptr(), len) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_lookup() {
        // SAFETY: as above.
        let done = unsafe { lookup_avx2(map, src.as_ptr(), dst.as_mut_ptr(), len) };
        for (d, &s) in dst[done..len].iter_mut().zip(&src[done..len]) {
            *d = map[s as usize];
        }
        return;
    }
    for (d, &s) in dst[..len].iter_mut().zip(src) {
        *d = map[s as usize];
    }
}

fn lookup_in_place(map: &[u8; 256], v: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if vbmi_lookup() {
        // SAFETY: as in `lookup`; each 64-byte block is read before it is overwritten.
        unsafe { lookup_vbmi(map, v.as_ptr(), v.as_mut_ptr(), v.len()) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_lookup() {
        // SAFETY: as in `lookup`; each 32-byte block is read before it is overwritten.
        let done = unsafe { lookup_avx2(map, v.as_ptr(), v.as_mut_ptr(), v.len()) };
        for c in v[done..].iter_mut() {
            *c = map[*c as usize];
        }
        return;
    }
    for c in v.iter_mut() {
        *c = map[*c as usize];
    }
}

/// 64 codes per step: `vpermt2b` looks each up in a 128-byte half of the table (the low seven
/// bits index it), and the top bit picks the half.
///
/// # Safety
/// AVX-512 F, BW and VBMI; `src` readable and `dst` writable for `len` bytes (they may be the
/// same buffer).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn lookup_vbmi(map: &[u8; 256], src: *const u8, dst: *mut u8, len: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the table loads read the 256 bytes of `map`; the masked loads and stores touch
    // only the `len` bytes the contract covers.
    unsafe {
        let t: [__m512i; 4] =
            std::array::from_fn(|i| _mm512_loadu_si512(map.as_ptr().add(64 * i) as *const _));
        let mut i = 0;
        while i < len {
            let lanes = (len - i).min(64);
            let mask: __mmask64 = if lanes == 64 { !0 } else { (1u64 << lanes) - 1 };
            let x = _mm512_maskz_loadu_epi8(mask, src.add(i) as *const i8);
            let lo = _mm512_permutex2var_epi8(t[0], x, t[1]);
            let hi = _mm512_permutex2var_epi8(t[2], x, t[3]);
            let r = _mm512_mask_blend_epi8(_mm512_movepi8_mask(x), lo, hi);
            _mm512_mask_storeu_epi8(dst.add(i) as *mut i8, mask, r);
            i += lanes;
        }
    }
}

/// 32 codes per step without a byte permute across 256 entries: the table is sixteen rows of
/// sixteen, `vpshufb` looks the low nibble up in every row, and the high nibble selects the
/// row. Returns how many leading bytes it mapped (whole 32-byte blocks); the caller maps the
/// rest.
///
/// # Safety
/// AVX2; `src` readable and `dst` writable for `len` bytes (they may be the same buffer).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lookup_avx2(map: &[u8; 256], src: *const u8, dst: *mut u8, len: usize) -> usize {
    use std::arch::x86_64::*;
    // SAFETY: the row loads read the 256 bytes of `map`; the block loads and stores touch
    // only whole 32-byte blocks inside `len`.
    unsafe {
        let rows: [__m256i; 16] = std::array::from_fn(|r| {
            _mm256_broadcastsi128_si256(_mm_loadu_si128(map.as_ptr().add(16 * r) as *const _))
        });
        let nibble = _mm256_set1_epi8(0x0f);
        let blocks = len / 32;
        for b in 0..blocks {
            let x = _mm256_loadu_si256(src.add(32 * b) as *const _);
            let lo = _mm256_and_si256(x, nibble);
            let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble);
            let mut r = _mm256_setzero_si256();
            for (row, table) in rows.iter().enumerate() {
                let pick = _mm256_cmpeq_epi8(hi, _mm256_set1_epi8(row as i8));
                r = _mm256_or_si256(r, _mm256_and_si256(pick, _mm256_shuffle_epi8(*table, lo)));
            }
            _mm256_storeu_si256(dst.add(32 * b) as *mut _, r);
        }
        blocks * 32
    }
}

/// Checks a run-time input against the type the table was built for.
fn check_input(node: &Node, x: &Tensor, want: DType) -> Result<()> {
    if x.dtype() != want {
        return Err(node_error(
            node,
            format!("fused step expects {want} codes, got {}", x.dtype()),
        ));
    }
    Ok(())
}

/// A `DequantizeLinear -> elementwise ops -> QuantizeLinear` chain as one table lookup.
pub struct LutKernel {
    /// The DequantizeLinear that starts the chain, for errors.
    node: Node,
    table: CodeTable,
}

impl LutKernel {
    pub fn new(node: &Node, table: CodeTable) -> LutKernel {
        LutKernel {
            node: node.clone(),
            table,
        }
    }
}

impl Kernel for LutKernel {
    fn run(&self, inputs: &[Option<&Tensor>], _ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        check_input(&self.node, x, self.table.input)?;
        Ok(vec![self.table.apply(x)?])
    }

    fn reuses_input(&self) -> Option<usize> {
        (self.table.input == self.table.output).then_some(0)
    }

    fn run_owned(
        &self,
        owned: Tensor,
        _inputs: &[Option<&Tensor>],
        _ctx: &mut RunCtx,
    ) -> Result<Vec<Tensor>> {
        check_input(&self.node, &owned, self.table.input)?;
        let shape = owned.shape().to_vec();
        let mut data = owned.into_data();
        if !self.table.apply_in_place(&mut data) {
            let x = Tensor::new(shape, data)?;
            return Ok(vec![self.table.apply(&x)?]);
        }
        Ok(vec![Tensor::new(shape, data)?])
    }
}

/// `DequantizeLinear -> MaxPool -> (elementwise ops) -> QuantizeLinear` on the codes: max
/// pooling of the input codes, then the chain's table.
pub struct MaxPoolLutKernel {
    /// The DequantizeLinear that starts the chain, for errors about its input.
    node: Node,
    /// The MaxPool, for errors about its windows and output.
    pool: Node,
    window: PoolWindow,
    table: CodeTable,
    /// The table is the identity: the pooled codes are the result.
    identity: bool,
    /// Bit pattern of the output code for a window that covers only padding: the f32 kernel
    /// yields `f32::MIN` there, and this is what the rest of the chain makes of that.
    empty: u8,
}

impl MaxPoolLutKernel {
    /// `pool` must be a MaxPool node; `empty` as [`MaxPoolLutKernel::empty`].
    pub fn new(node: &Node, pool: &Node, table: CodeTable, empty: u8) -> Result<Self> {
        let window = PoolWindow::parse(pool)?;
        if window.kind() != PoolKind::Max {
            return Err(node_error(pool, "integer pooling is for MaxPool only"));
        }
        Ok(MaxPoolLutKernel {
            node: node.clone(),
            pool: pool.clone(),
            window,
            identity: table.is_identity(),
            table,
            empty,
        })
    }
}

impl Kernel for MaxPoolLutKernel {
    fn run(&self, inputs: &[Option<&Tensor>], _ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        check_input(&self.node, x, self.table.input)?;
        let s = self
            .window
            .resolve(x.shape())
            .map_err(|e| e.at_node(&self.pool))?;
        let dims = [s.planes, s.hw[0], s.hw[1]];
        fn go<I: Code, O: Code>(
            k: &MaxPoolLutKernel,
            x: &Tensor,
            g: &Pool2dGeom,
            dims: [usize; 3],
            shape: Vec<usize>,
        ) -> Result<Tensor> {
            let src = I::slice(x.data()).unwrap_or(&[]);
            // Pads and strides come from the file: bound the output before allocating it.
            let (oh, ow) = g.out_hw(dims[1], dims[2])?;
            let n = checked_numel(&shape, 1)?;
            let mut out = vec![O::from_bits(0); n];
            let empty = O::from_bits(k.empty);
            let floor_halves = (oh, ow) == (dims[1] / 2, dims[2] / 2);
            if k.identity && I::ORDER == O::ORDER && is_plain_2x2(g) && floor_halves {
                if !max_2x2_planes(bytes(src), dims, I::ORDER, bytes_mut(&mut out)) {
                    return Err(Error::Shape(format!(
                        "integer max pool: input has {} values for {dims:?}",
                        src.len()
                    )));
                }
            } else if k.identity {
                max_pool_codes(g, src, dims, &mut out, |c| O::from_bits(c.bits()), empty)?;
            } else {
                max_pool_codes(g, src, dims, &mut out, |c| k.table.get(c), empty)?;
            }
            Tensor::new(shape, O::wrap(out))
        }
        let out = match (self.table.input, self.table.output) {
            (DType::U8, DType::U8) => go::<u8, u8>(self, x, &s.geom, dims, s.out_shape),
            (DType::U8, _) => go::<u8, i8>(self, x, &s.geom, dims, s.out_shape),
            (_, DType::U8) => go::<i8, u8>(self, x, &s.geom, dims, s.out_shape),
            _ => go::<i8, i8>(self, x, &s.geom, dims, s.out_shape),
        };
        Ok(vec![out.map_err(|e| e.at_node(&self.pool))?])
    }
}

/// The valid taps `lo..hi` of a window starting at `start` (may be negative) with `k` taps
/// `d` apart over an axis of `size`; empty when the window covers only padding.
fn tap_range(start: isize, k: usize, d: usize, size: usize) -> (usize, usize) {
    let d = d as isize;
    let lo = if start < 0 { (-start + d - 1) / d } else { 0 };
    let room = size as isize - start;
    let hi = if room <= 0 { 0 } else { (room + d - 1) / d };
    let hi = (hi as usize).min(k);
    (lo as usize, hi.max(lo as usize))
}

/// Max pooling of `x` (`[planes, h, w]` codes) into `out` (`[planes, oh, ow]`) through `map`,
/// with the windows of the f32 kernel ([`crate::kernels::pool::pool2d`]); a window with no
/// input element gets `empty`.
fn max_pool_codes<I: Code, O: Copy + Send + Sync>(
    g: &Pool2dGeom,
    x: &[I],
    [planes, h, w]: [usize; 3],
    out: &mut [O],
    map: impl Fn(I) -> O + Sync,
    empty: O,
) -> Result<()> {
    g.validate()?;
    let (oh, ow) = g.out_hw(h, w)?;
    if x.len() != planes * h * w || out.len() != planes * oh * ow {
        return Err(Error::Shape(format!(
            "integer max pool: input has {} values (expected {}), output {} (expected {})",
            x.len(),
            planes * h * w,
            out.len(),
            planes * oh * ow
        )));
    }
    if x.is_empty() {
        // Only padding: every window is empty.
        out.fill(empty);
        return Ok(());
    }
    if is_plain_2x2(g) && h % 2 == 0 && w % 2 == 0 {
        max_2x2(x, w, out, &map);
        return Ok(());
    }
    let taps = |o: usize, axis: usize, size: usize| {
        let start = (o * g.stride[axis]) as isize - g.pads[axis] as isize;
        let (lo, hi) = tap_range(start, g.kernel[axis], g.dilation[axis], size);
        // First input index of the window and the valid taps.
        (start + (lo * g.dilation[axis]) as isize, hi - lo)
    };
    let rows: Vec<(isize, usize)> = (0..oh).map(|o| taps(o, 0, h)).collect();
    let cols: Vec<(isize, usize)> = (0..ow).map(|o| taps(o, 1, w)).collect();
    let (dh, dw) = (g.dilation[0], g.dilation[1]);
    let empty_cols: Vec<usize> = (0..ow).filter(|&o| cols[o].1 == 0).collect();
    // Every window has all its columns inside the input, with consecutive taps: the
    // horizontal max is a plain loop over contiguous slices that the compiler vectorises.
    let kw = g.kernel[1];
    let dense = dw == 1 && cols.iter().all(|c| c.1 == kw);
    let plane = |src: &[I], dst: &mut [O], buf: &mut Vec<I>| {
        buf.clear();
        buf.resize(w + ow, I::from_bits(0));
        let (rowmax, hmax) = buf.split_at_mut(w);
        for (&(y0, ny), drow) in rows.iter().zip(dst.chunks_exact_mut(ow)) {
            if ny == 0 {
                drow.fill(empty);
                continue;
            }
            // Vertical max of the window's rows, then the taps along the row.
            let y0 = y0 as usize;
            rowmax.copy_from_slice(&src[y0 * w..(y0 + 1) * w]);
            for t in 1..ny {
                let y = y0 + t * dh;
                for (m, &v) in rowmax.iter_mut().zip(&src[y * w..(y + 1) * w]) {
                    *m = (*m).max(v);
                }
            }
            if dense && kw == 2 && g.stride[1] == 2 {
                let x0 = cols[0].0 as usize;
                let pairs = rowmax[x0..x0 + 2 * ow].chunks_exact(2);
                for (m, p) in hmax.iter_mut().zip(pairs) {
                    *m = p[0].max(p[1]);
                }
            } else if dense {
                for (m, &(x0, _)) in hmax.iter_mut().zip(&cols) {
                    let x0 = x0 as usize;
                    *m = rowmax[x0..x0 + kw].iter().copied().fold(rowmax[x0], I::max);
                }
            } else {
                for (m, &(x0, nx)) in hmax.iter_mut().zip(&cols) {
                    if nx > 0 {
                        let x0 = x0 as usize;
                        *m = (1..nx).fold(rowmax[x0], |a, t| a.max(rowmax[x0 + t * dw]));
                    }
                }
            }
            for (o, &m) in drow.iter_mut().zip(hmax.iter()) {
                *o = map(m);
            }
            for &o in &empty_cols {
                drow[o] = empty;
            }
        }
    };
    let (plane_in, plane_out) = (h * w, oh * ow);
    let threads = crate::kernels::par::threads();
    if threads > 1 && planes > 1 && x.len() >= PAR_MIN_POOL {
        let per_task = planes.div_ceil(threads * 4).max(1);
        out.par_chunks_mut(per_task * plane_out)
            .zip(x.par_chunks(per_task * plane_in))
            .for_each_init(Vec::new, |buf, (d, s)| {
                for (d, s) in d.chunks_exact_mut(plane_out).zip(s.chunks_exact(plane_in)) {
                    plane(s, d, buf);
                }
            });
    } else {
        let mut buf = Vec::with_capacity(w + ow);
        for (d, s) in out
            .chunks_exact_mut(plane_out)
            .zip(x.chunks_exact(plane_in))
        {
            plane(s, d, &mut buf);
        }
    }
    Ok(())
}

/// A 2x2 window, stride 2, no dilation or padding.
fn is_plain_2x2(g: &Pool2dGeom) -> bool {
    g.kernel == [2, 2] && g.stride == [2, 2] && g.dilation == [1, 1] && g.pads == [0; 4]
}

/// The common 2x2 / stride 2 window without padding on even extents: output row `r` (of
/// all planes in a row) reads input rows `2r` and `2r + 1`, every window full.
fn max_2x2<I: Code, O: Copy + Send + Sync>(
    x: &[I],
    w: usize,
    out: &mut [O],
    map: &(impl Fn(I) -> O + Sync),
) {
    let ow = w / 2;
    let rows = |first: usize, dst: &mut [O]| {
        for (r, o) in dst.chunks_exact_mut(ow).enumerate() {
            let top = 2 * (first + r) * w;
            let (a, b) = x[top..top + 2 * w].split_at(w);
            for ((o, a), b) in o.iter_mut().zip(a.chunks_exact(2)).zip(b.chunks_exact(2)) {
                *o = map(a[0].max(a[1]).max(b[0].max(b[1])));
            }
        }
    };
    let threads = crate::kernels::par::threads();
    if threads > 1 && x.len() >= PAR_MIN_POOL {
        let per_task = (out.len() / ow).div_ceil(threads * 4).max(1);
        out.par_chunks_mut(per_task * ow)
            .enumerate()
            .for_each(|(t, d)| rows(t * per_task, d));
    } else {
        rows(0, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pool::pool2d;

    use crate::quant::test_rng::Rng;

    /// Uniform in `0..n`.
    fn below(rng: &mut Rng, n: usize) -> usize {
        rng.range_i32(0, n as i32 - 1) as usize
    }

    /// Integer pooling equals f32 pooling of the codes (as floats), with `f32::MIN` for empty
    /// windows mapped to the `empty` code.
    #[test]
    fn integer_max_pool_matches_f32_pool_on_codes() {
        let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
        for case in 0..300 {
            let kernel = [1 + below(&mut rng, 3), 1 + below(&mut rng, 3)];
            let stride = [1 + below(&mut rng, 3), 1 + below(&mut rng, 3)];
            let dilation = [1 + below(&mut rng, 2), 1 + below(&mut rng, 2)];
            let pads = [
                below(&mut rng, 3),
                below(&mut rng, 3),
                below(&mut rng, 3),
                below(&mut rng, 3),
            ];
            let g = Pool2dGeom {
                kernel,
                stride,
                dilation,
                pads,
                ceil_mode: below(&mut rng, 2) == 1,
            };
            let (h, w, planes) = (
                1 + below(&mut rng, 7),
                1 + below(&mut rng, 7),
                1 + below(&mut rng, 3),
            );
            let Ok((oh, ow)) = g.out_hw(h, w) else {
                continue;
            };
            let codes: Vec<i8> = (0..planes * h * w).map(|_| rng.next_u64() as i8).collect();
            let xf: Vec<f32> = codes.iter().map(|&c| c as f32).collect();
            let mut want = vec![0f32; planes * oh * ow];
            pool2d(&g, PoolKind::Max, &xf, [planes, h, w], &mut want).unwrap();
            let mut got = vec![0i16; planes * oh * ow];
            let empty = i16::MIN;
            max_pool_codes(&g, &codes, [planes, h, w], &mut got, i16::from, empty)
                .unwrap_or_else(|e| panic!("case {case}: {e}"));
            for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                let b = if b == f32::MIN { empty } else { b as i16 };
                assert_eq!(a, b, "case {case} {g:?} h {h} w {w} at {i}");
            }
        }
    }

    #[test]
    fn tables_map_by_bit_pattern() {
        let codes = CodeTable::all_codes(DType::I8).unwrap();
        let neg: Vec<i8> = codes
            .to_i64_vec()
            .unwrap()
            .iter()
            .map(|&c| (-c).clamp(-128, 127) as i8)
            .collect();
        let mapped = Tensor::new(vec![256], TensorData::I8(neg)).unwrap();
        let t = CodeTable::from_outputs(DType::I8, &mapped).unwrap();
        assert!(!t.is_identity());
        let x = Tensor::new(vec![3], TensorData::I8(vec![-128, 0, 5])).unwrap();
        let k = LutKernel::new(&Node::new("dq", "DequantizeLinear", vec![], vec![]), t);
        let y = k.run(&[Some(&x)], &mut RunCtx::default()).unwrap();
        assert_eq!(y[0].data(), &TensorData::I8(vec![127, 0, -5]));
        let y = k.run_owned(x, &[None], &mut RunCtx::default()).unwrap();
        assert_eq!(y[0].data(), &TensorData::I8(vec![127, 0, -5]));
        let id = CodeTable::from_outputs(DType::U8, &CodeTable::all_codes(DType::U8).unwrap());
        assert!(id.unwrap().is_identity());
        let wrong = Tensor::new(vec![1], TensorData::U8(vec![1])).unwrap();
        assert!(k.run(&[Some(&wrong)], &mut RunCtx::default()).is_err());
    }

    #[test]
    fn vector_lookup_matches_the_table_at_every_length() {
        let mut rng = Rng::new(0x1234_5678);
        let mut map = [0u8; 256];
        map.iter_mut().for_each(|m| *m = rng.next_u64() as u8);
        for len in (0..200).chain([4095, 65536 + 17]) {
            let src: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            let want: Vec<u8> = src.iter().map(|&c| map[c as usize]).collect();
            let mut dst = vec![0u8; len];
            lookup(&map, &src, &mut dst);
            assert_eq!(dst, want, "len {len}");
            let mut v = src.clone();
            lookup_in_place(&map, &mut v);
            assert_eq!(v, want, "in place, len {len}");
            // The AVX2 form, which a CPU with VBMI never takes.
            #[cfg(target_arch = "x86_64")]
            if avx2_lookup() {
                let mut dst = vec![0u8; len];
                // SAFETY: AVX2 was detected; both buffers hold `len` bytes.
                let done = unsafe { lookup_avx2(&map, src.as_ptr(), dst.as_mut_ptr(), len) };
                assert_eq!(done, len / 32 * 32);
                assert_eq!(dst[..done], want[..done], "avx2, len {len}");
            }
        }
    }
}
