//! Image preprocessing specs: how 8-bit images become a model's f32 input.
//!
//! A spec is a comma-separated string, stored in ONNX metadata under `lithe.preprocess`:
//!
//! ```text
//! imagenet                                  preset (must come first; later items override)
//! gray | rgb | bgr                          output channels (default rgb)
//! resize=256                                shorter side to 256, aspect kept (torchvision Resize(256))
//! resize=32x24                              exactly 32 wide, 24 high
//! crop=224 | crop=32x24                     centre crop, WIDTHxHEIGHT (torchvision CenterCrop)
//! scale=1                                   a full-intensity pixel (255) becomes `scale` (default 1)
//! mean=0.485:0.456:0.406                    per-channel (in output order) or one value for all
//! std=0.229:0.224:0.225
//! ```
//!
//! Each sample is `(p / 255 * scale - mean[c]) / std[c]` for the 8-bit pixel `p`, so the
//! default is torchvision's `ToTensor` + `Normalize`, and `scale=255,mean=127,std=128` is
//! `(p - 127) / 128`. Presets: `imagenet` (RGB, resize 256, crop 224, ImageNet mean/std),
//! `mnist` and `fashion-mnist` (gray 28x28 with each set's mean/std).
//! Order of operations: channel conversion, resize, crop, normalisation.

use std::fmt;
use std::str::FromStr;

use crate::data::image::Image;
use crate::error::{Error, Result};
use crate::ir::{checked_numel, Tensor, TensorData};

/// ONNX metadata key under which a model's preprocess spec is stored.
pub const METADATA_KEY: &str = "lithe.preprocess";

/// Largest side a spec may ask for; keeps a typo from allocating gigabytes.
const MAX_SIDE: usize = 1 << 15;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channels {
    Gray,
    Rgb,
    Bgr,
}

impl Channels {
    pub fn count(self) -> usize {
        match self {
            Channels::Gray => 1,
            Channels::Rgb | Channels::Bgr => 3,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    /// Shorter side to this length, aspect ratio kept.
    Shorter(usize),
    Exact {
        width: usize,
        height: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    pub channels: Channels,
    pub resize: Option<Resize>,
    /// Centre crop (width, height).
    pub crop: Option<(usize, usize)>,
    pub scale: f32,
    /// One value, or one per output channel.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Default for Preprocess {
    /// RGB, no geometry, pixels to [0, 1].
    fn default() -> Preprocess {
        Preprocess {
            channels: Channels::Rgb,
            resize: None,
            crop: None,
            scale: 1.0,
            mean: vec![0.0],
            std: vec![1.0],
        }
    }
}

impl Preprocess {
    /// The named presets; `None` for an unknown name.
    pub fn preset(name: &str) -> Option<Preprocess> {
        let gray28 = |mean: f32, std: f32| Preprocess {
            channels: Channels::Gray,
            resize: Some(Resize::Exact {
                width: 28,
                height: 28,
            }),
            crop: None,
            scale: 1.0,
            mean: vec![mean],
            std: vec![std],
        };
        match name {
            "imagenet" => Some(Preprocess {
                channels: Channels::Rgb,
                resize: Some(Resize::Shorter(256)),
                crop: Some((224, 224)),
                scale: 1.0,
                mean: vec![0.485, 0.456, 0.406],
                std: vec![0.229, 0.224, 0.225],
            }),
            "mnist" => Some(gray28(0.1307, 0.3081)),
            "fashion-mnist" | "fashion_mnist" | "fashionmnist" => Some(gray28(0.2860, 0.3530)),
            _ => None,
        }
    }

    /// Parses a spec (see the module docs) and validates it.
    pub fn parse(spec: &str) -> Result<Preprocess> {
        let bad = |msg: String| Error::Data(format!("preprocess spec '{spec}': {msg}"));
        let items: Vec<&str> = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if items.is_empty() {
            return Err(bad("empty".into()));
        }
        let mut p = Preprocess::default();
        for (i, item) in items.iter().enumerate() {
            let lower = item.to_ascii_lowercase();
            if let Some(preset) = Preprocess::preset(&lower) {
                if i != 0 {
                    return Err(bad(format!("preset '{item}' must come first")));
                }
                p = preset;
                continue;
            }
            match lower.as_str() {
                "gray" | "grey" => p.channels = Channels::Gray,
                "rgb" => p.channels = Channels::Rgb,
                "bgr" => p.channels = Channels::Bgr,
                _ => {
                    let (key, value) = item.split_once('=').ok_or_else(|| {
                        bad(format!(
                            "unknown item '{item}' (expected a preset, gray/rgb/bgr, or \
                             resize=, crop=, scale=, mean=, std=)"
                        ))
                    })?;
                    let value = value.trim();
                    match key.trim().to_ascii_lowercase().as_str() {
                        "resize" => {
                            p.resize = Some(match parse_size(value).map_err(&bad)? {
                                (w, None) => Resize::Shorter(w),
                                (width, Some(height)) => Resize::Exact { width, height },
                            })
                        }
                        "crop" => {
                            let (w, h) = parse_size(value).map_err(&bad)?;
                            p.crop = Some((w, h.unwrap_or(w)));
                        }
                        "scale" => p.scale = parse_f32(value).map_err(&bad)?,
                        "mean" => p.mean = parse_list(value).map_err(&bad)?,
                        "std" => p.std = parse_list(value).map_err(&bad)?,
                        other => return Err(bad(format!("unknown key '{other}'"))),
                    }
                }
            }
        }
        p.validate().map_err(|e| bad(e.to_string()))?;
        Ok(p)
    }

    /// Checks the invariants `parse` guarantees, for specs built in code.
    pub fn validate(&self) -> Result<()> {
        let c = self.channels.count();
        for (what, v) in [("mean", &self.mean), ("std", &self.std)] {
            if v.len() != 1 && v.len() != c {
                return Err(Error::Data(format!(
                    "{what} has {} values; {} output channel(s) need 1 or {c}",
                    v.len(),
                    c
                )));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::Data(format!("{what} must be finite")));
            }
        }
        if self.std.contains(&0.0) {
            return Err(Error::Data("std must not be zero".into()));
        }
        if !self.scale.is_finite() || self.scale == 0.0 {
            return Err(Error::Data("scale must be finite and non-zero".into()));
        }
        let sides = match self.resize {
            Some(Resize::Shorter(s)) => vec![s],
            Some(Resize::Exact { width, height }) => vec![width, height],
            None => vec![],
        };
        let crop = self.crop.map_or(vec![], |(w, h)| vec![w, h]);
        if sides.iter().chain(&crop).any(|&s| s == 0 || s > MAX_SIDE) {
            return Err(Error::Data(format!(
                "sizes must be between 1 and {MAX_SIDE}"
            )));
        }
        Ok(())
    }

    /// Output (width, height) when it does not depend on the input image.
    pub fn fixed_size(&self) -> Option<(usize, usize)> {
        match (self.crop, self.resize) {
            (Some(c), _) => Some(c),
            (None, Some(Resize::Exact { width, height })) => Some((width, height)),
            _ => None,
        }
    }

    /// Output shape [C, H, W] for an input of `width` x `height`.
    pub fn output_shape(&self, width: usize, height: usize) -> [usize; 3] {
        let (w, h) = self.fixed_size().unwrap_or(match self.resize {
            Some(Resize::Shorter(s)) => shorter_side_dims(width, height, s),
            _ => (width, height),
        });
        [self.channels.count(), h, w]
    }

    /// The f32 input tensor [C, H, W] for one image.
    pub fn apply(&self, image: &Image) -> Result<Tensor> {
        let mut out = Vec::new();
        let shape = self.apply_into(image, &mut out)?;
        Tensor::from_f32(shape.to_vec(), out)
    }

    /// A batch [N, C, H, W]; every image must come out the same size (use a crop or an
    /// exact resize for images of mixed sizes).
    pub fn apply_batch(&self, images: &[Image]) -> Result<Tensor> {
        let mut out = Vec::new();
        let mut shape: Option<[usize; 3]> = None;
        for (i, img) in images.iter().enumerate() {
            let s = self.apply_into(img, &mut out)?;
            match shape {
                None => shape = Some(s),
                Some(first) if first != s => {
                    return Err(Error::Data(format!(
                        "image {i} preprocesses to {s:?} but image 0 to {first:?}; \
                         add crop= or resize=WxH to the preprocess spec"
                    )))
                }
                _ => {}
            }
        }
        let [c, h, w] = shape.unwrap_or(self.output_shape(0, 0));
        Tensor::from_f32(vec![images.len(), c, h, w], out)
    }

    /// Preprocesses 8-bit gray images [N, rows, cols] (IDX/MNIST layout) into
    /// [N, C, H, W]; gray is replicated for RGB specs.
    pub fn apply_gray_u8(&self, images: &Tensor) -> Result<Tensor> {
        let (TensorData::U8(pixels), &[n, rows, cols]) = (images.data(), images.shape()) else {
            return Err(Error::Data(format!(
                "expected u8 images [N, rows, cols], got {} {:?}",
                images.dtype(),
                images.shape()
            )));
        };
        let [c, h, w] = self.output_shape(cols, rows);
        let total = checked_numel(&[n, c, h, w], 4)?;
        if total == 0 {
            return Tensor::from_f32(vec![n, c, h, w], vec![]);
        }
        let mut out = Vec::with_capacity(total);
        let px = rows * cols;
        for i in 0..n {
            let img = Image {
                width: cols,
                height: rows,
                channels: 1,
                data: pixels[i * px..(i + 1) * px].to_vec(),
            };
            self.apply_into(&img, &mut out)?;
        }
        Tensor::from_f32(vec![n, c, h, w], out)
    }

    /// Appends the CHW samples of `image` to `out` and returns their shape.
    fn apply_into(&self, image: &Image, out: &mut Vec<f32>) -> Result<[usize; 3]> {
        self.validate()?;
        let mut img = match self.channels {
            Channels::Gray => image.to_gray(),
            Channels::Rgb | Channels::Bgr => image.to_rgb(),
        };
        match self.resize {
            Some(Resize::Shorter(s)) => img = img.resize_shorter(s)?,
            Some(Resize::Exact { width, height }) => img = img.resize(width, height)?,
            None => {}
        }
        if let Some((w, h)) = self.crop {
            if (w, h) != (img.width, img.height) {
                img = img.center_crop(w, h)?;
            }
        }
        let c = img.channels;
        let plane = img.width * img.height;
        checked_numel(&[out.len() + c * plane], 4)?;
        let luts: Vec<[f32; 256]> = (0..c).map(|ch| self.lut(ch)).collect();
        let start = out.len();
        out.resize(start + c * plane, 0.0);
        let dst = &mut out[start..];
        for ch in 0..c {
            // BGR reads the RGB planes in reverse; mean/std follow the output order.
            let src_ch = if self.channels == Channels::Bgr {
                c - 1 - ch
            } else {
                ch
            };
            let lut = &luts[ch];
            for (d, px) in dst[ch * plane..(ch + 1) * plane]
                .iter_mut()
                .zip(img.data.chunks_exact(c))
            {
                *d = lut[px[src_ch] as usize];
            }
        }
        Ok([c, img.height, img.width])
    }

    /// The value of every 8-bit level in output channel `ch`, computed the way torchvision
    /// does (f32 divide by 255, subtract, divide) so results match it exactly.
    fn lut(&self, ch: usize) -> [f32; 256] {
        let mean = self.mean[if self.mean.len() == 1 { 0 } else { ch }];
        let std = self.std[if self.std.len() == 1 { 0 } else { ch }];
        let factor = (self.scale as f64 / 255.0) as f32;
        let mut lut = [0f32; 256];
        for (p, v) in lut.iter_mut().enumerate() {
            let x = if self.scale == 1.0 {
                p as f32 / 255.0
            } else {
                p as f32 * factor
            };
            *v = (x - mean) / std;
        }
        lut
    }
}

fn shorter_side_dims(w: usize, h: usize, size: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    if short == size || short == 0 {
        return (w, h);
    }
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

fn parse_size(s: &str) -> std::result::Result<(usize, Option<usize>), String> {
    let num = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("'{s}' is not a size (N or WIDTHxHEIGHT)"))
    };
    match s.split_once(['x', 'X']) {
        Some((w, h)) => Ok((num(w)?, Some(num(h)?))),
        None => Ok((num(s)?, None)),
    }
}

fn parse_f32(s: &str) -> std::result::Result<f32, String> {
    s.trim()
        .parse::<f32>()
        .map_err(|_| format!("'{s}' is not a number"))
}

fn parse_list(s: &str) -> std::result::Result<Vec<f32>, String> {
    s.split(':').map(parse_f32).collect()
}

impl FromStr for Preprocess {
    type Err = Error;
    fn from_str(s: &str) -> Result<Preprocess> {
        Preprocess::parse(s)
    }
}

/// The canonical spec string; `Preprocess::parse` of it gives back an equal value.
impl fmt::Display for Preprocess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.channels {
            Channels::Gray => "gray",
            Channels::Rgb => "rgb",
            Channels::Bgr => "bgr",
        })?;
        match self.resize {
            Some(Resize::Shorter(s)) => write!(f, ",resize={s}")?,
            Some(Resize::Exact { width, height }) => write!(f, ",resize={width}x{height}")?,
            None => {}
        }
        match self.crop {
            Some((w, h)) if w == h => write!(f, ",crop={w}")?,
            Some((w, h)) => write!(f, ",crop={w}x{h}")?,
            None => {}
        }
        // f32's Display is the shortest text that parses back to the same value.
        let list = |v: &[f32]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(":")
        };
        if self.scale != 1.0 {
            write!(f, ",scale={}", self.scale)?;
        }
        if self.mean != [0.0] {
            write!(f, ",mean={}", list(&self.mean))?;
        }
        if self.std != [1.0] {
            write!(f, ",std={}", list(&self.std))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::idx::read_idx_images;
    use crate::data::image::read_image;
    use crate::data::npy::read_npy;
    use crate::data::test_util::{fixture, shared_dir};

    #[test]
    fn parse_presets_and_overrides() {
        let p = Preprocess::parse("imagenet").unwrap();
        assert_eq!(p.channels, Channels::Rgb);
        assert_eq!(p.resize, Some(Resize::Shorter(256)));
        assert_eq!(p.crop, Some((224, 224)));
        assert_eq!(p.mean, vec![0.485, 0.456, 0.406]);
        let q = Preprocess::parse(" imagenet , bgr, crop=200x100 ").unwrap();
        assert_eq!((q.channels, q.crop), (Channels::Bgr, Some((200, 100))));
        let m = Preprocess::parse("mnist").unwrap();
        assert_eq!(m.to_string(), "gray,resize=28x28,mean=0.1307,std=0.3081");
        let s = Preprocess::parse("resize=256,crop=224,scale=255,mean=127,std=128").unwrap();
        assert_eq!(s.scale, 255.0);
        assert_eq!(s.resize, Some(Resize::Shorter(256)));
        let d = Preprocess::parse("mean=0.485:0.456:0.406,std=0.229:0.224:0.225").unwrap();
        assert_eq!(d.std.len(), 3);
    }

    #[test]
    fn display_parses_back_to_the_same_value() {
        for spec in [
            "imagenet",
            "mnist",
            "fashion-mnist",
            "rgb",
            "bgr,resize=28,crop=21x25,scale=255,mean=127,std=128",
            "gray,resize=9x7,crop=5,mean=0.1,std=0.30000001",
            "rgb,scale=-1.5,mean=1e-7:2:3,std=3:1e30:0.1",
        ] {
            let p = Preprocess::parse(spec).unwrap();
            let text = p.to_string();
            assert_eq!(Preprocess::parse(&text).unwrap(), p, "{spec} -> {text}");
            assert_eq!(text.parse::<Preprocess>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn bad_specs_are_errors() {
        for spec in [
            "",
            ",",
            "rgb,mnist",
            "resize=0",
            "resize=10x",
            "crop=-3",
            "crop=99999999",
            "mean=1:2",
            "gray,mean=1:2:3",
            "std=0",
            "std=nan",
            "scale=0",
            "size=3",
            "hsv",
        ] {
            let e = Preprocess::parse(spec).unwrap_err().to_string();
            assert!(e.contains("preprocess spec"), "{spec}: {e}");
        }
    }

    fn assert_close(got: &Tensor, want_npy: &str) {
        let want = read_npy(fixture(want_npy)).unwrap();
        assert_eq!(got.shape(), want.shape(), "{want_npy}");
        let (g, w) = (got.as_f32().unwrap(), want.as_f32().unwrap());
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!((a - b).abs() <= 1e-6, "{want_npy}[{i}]: {a} vs {b}");
        }
    }

    #[test]
    fn matches_pillow_and_torchvision_references() {
        let img = read_image(fixture("rgb_37x23.png")).unwrap();
        let p =
            Preprocess::parse("rgb,resize=16,crop=12,mean=0.485:0.456:0.406,std=0.229:0.224:0.225")
                .unwrap();
        assert_close(&p.apply(&img).unwrap(), "pre_imagenet_small.npy");
        let p = Preprocess::parse("bgr,resize=28,crop=21x25,scale=255,mean=127,std=128").unwrap();
        assert_close(&p.apply(&img).unwrap(), "pre_bgr_up.npy");
        let p = Preprocess::parse("gray,crop=40x25,mean=0.5,std=0.25").unwrap();
        assert_eq!(p.output_shape(37, 23), [1, 25, 40]);
        assert_close(&p.apply(&img).unwrap(), "pre_gray_pad.npy");
        let batch = p.apply_batch(&[img.clone(), img.to_gray()]).unwrap();
        assert_eq!(batch.shape(), &[2, 1, 25, 40]);
        let mixed = Preprocess::parse("gray").unwrap();
        let small = img.resize(5, 5).unwrap();
        assert!(mixed.apply_batch(&[img, small]).is_err());
    }

    #[test]
    fn mnist_normalisation_matches_numpy() {
        let images = read_idx_images(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("assets/mnist/t10k-images-idx3-ubyte.gz"),
        )
        .unwrap();
        let first = Tensor::new(
            vec![1, 28, 28],
            TensorData::U8(match images.data() {
                TensorData::U8(v) => v[..784].to_vec(),
                _ => unreachable!(),
            }),
        )
        .unwrap();
        let x = Preprocess::parse("mnist")
            .unwrap()
            .apply_gray_u8(&first)
            .unwrap();
        assert_eq!(x.shape(), &[1, 1, 28, 28]);
        let v = x.as_f32().unwrap();
        // From numpy in float32: (x / 255 - 0.1307) / 0.3081.
        assert_eq!(v[0], -0.42421296);
        assert_eq!(v[7 * 28 + 7], 1.9305104);
        let sum: f64 = v.iter().map(|&a| a as f64).sum();
        assert!((sum - -97.6961311865598).abs() < 1e-9, "{sum}");
        // RGB specs replicate gray.
        let rgb = Preprocess::parse("rgb,resize=14").unwrap();
        assert_eq!(rgb.apply_gray_u8(&first).unwrap().shape(), &[1, 3, 14, 14]);
    }

    #[test]
    fn imagenet_preset_on_a_real_photo_matches_torchvision() {
        let Some(shared) = shared_dir("imagenet_preset_on_a_real_photo") else {
            return;
        };
        let img = read_image(shared.join("images/photos/chelsea.png")).unwrap();
        let x = Preprocess::parse("imagenet").unwrap().apply(&img).unwrap();
        assert_eq!(x.shape(), &[3, 224, 224]);
        let v = x.as_f32().unwrap();
        // Pillow resize((384, 256), BILINEAR), centre crop, ToTensor, Normalize in numpy.
        let sum: f64 = v.iter().map(|&a| a as f64).sum();
        assert!((sum - REF_SUM).abs() < 1e-3, "{sum}");
        for (i, want) in REF_SAMPLES {
            assert_eq!(v[i], want, "element {i}");
        }
    }

    const REF_SUM: f64 = -15780.764266122133;
    const REF_SAMPLES: [(usize, f32); 5] = [
        (0, 0.79330426),
        (1000, 0.38231018),
        (50000, 0.673431),
        (100000, -0.53011197),
        (150527, 0.77507645),
    ];
}
