//! 8-bit images: PNG and JPEG decoding, and the geometric steps of classifier preprocessing
//! (resize, centre crop) computed the way Pillow and torchvision compute them.
//!
//! Resizing reproduces Pillow's `Image.resize(..., BILINEAR)` bit for bit: a triangle filter
//! whose support widens with the downscale factor (so downscaling is antialiased, as in
//! torchvision's default `antialias=True` for PIL input), fixed-point coefficients, and a
//! horizontal pass then a vertical pass, each rounded to u8. Upscaling is ordinary
//! half-pixel-centre bilinear interpolation.

use std::io::Cursor;
use std::path::Path;

use crate::error::{Error, Result};

/// Largest decoded image we accept, in bytes of 8-bit samples.
const MAX_IMAGE_BYTES: usize = 1 << 30;

/// An 8-bit image: gray (1 channel) or RGB (3 channels), rows top to bottom, samples
/// interleaved (HWC).
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Image {
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<Image> {
        if channels != 1 && channels != 3 {
            return Err(Error::Data(format!(
                "images have 1 (gray) or 3 (RGB) channels, not {channels}"
            )));
        }
        let n = width
            .checked_mul(height)
            .and_then(|p| p.checked_mul(channels));
        if n != Some(data.len()) {
            return Err(Error::Data(format!(
                "{width}x{height}x{channels} image needs {} bytes, got {}",
                n.map_or("too many".to_string(), |n| n.to_string()),
                data.len()
            )));
        }
        Ok(Image {
            width,
            height,
            channels,
            data,
        })
    }

    pub fn is_gray(&self) -> bool {
        self.channels == 1
    }

    /// RGB version: gray is replicated into the three channels (as Pillow's `convert("RGB")`).
    pub fn to_rgb(&self) -> Image {
        if self.channels == 3 {
            return self.clone();
        }
        let data = self.data.iter().flat_map(|&g| [g, g, g]).collect();
        Image {
            data,
            channels: 3,
            ..*self
        }
    }

    /// Gray version, with Pillow's ITU-R 601-2 luma in 16-bit fixed point
    /// (`convert("L")`): L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16.
    pub fn to_gray(&self) -> Image {
        if self.channels == 1 {
            return self.clone();
        }
        let data = self
            .data
            .chunks_exact(3)
            .map(|p| {
                ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16)
                    as u8
            })
            .collect();
        Image {
            data,
            channels: 1,
            ..*self
        }
    }

    /// Resizes to exactly `width` x `height` (Pillow bilinear; see the module docs).
    /// Errors only when the result would exceed the decoded-image size limit.
    pub fn resize(&self, width: usize, height: usize) -> Result<Image> {
        let c = self.channels;
        check_size(width, height, c)?;
        if width == self.width && height == self.height {
            return Ok(self.clone());
        }
        if self.width == 0 || self.height == 0 || width == 0 || height == 0 {
            return Ok(Image {
                width,
                height,
                channels: c,
                data: vec![0; width * height * c],
            });
        }
        let horiz = Coeffs::new(self.width, width);
        let vert = Coeffs::new(self.height, height);
        // Pillow only filters the source rows the vertical pass will read.
        let first_row = vert.bounds[0].0;
        let last_row = vert.bounds[height - 1].0 + vert.bounds[height - 1].1;
        let mut cur = self.clone();
        let mut row_shift = 0;
        if width != self.width {
            let mut out = vec![0u8; width * (last_row - first_row) * c];
            for (y, out_row) in out.chunks_exact_mut(width * c).enumerate() {
                let in_row = &self.data[(first_row + y) * self.width * c..][..self.width * c];
                for (x, out_px) in out_row.chunks_exact_mut(c).enumerate() {
                    let (start, k) = horiz.taps(x);
                    for (ch, o) in out_px.iter_mut().enumerate() {
                        let mut acc = 1i32 << (PRECISION_BITS - 1);
                        for (i, &w) in k.iter().enumerate() {
                            acc += in_row[(start + i) * c + ch] as i32 * w;
                        }
                        *o = clip8(acc);
                    }
                }
            }
            cur = Image {
                width,
                height: last_row - first_row,
                channels: c,
                data: out,
            };
            row_shift = first_row;
        }
        if height != self.height {
            let stride = width * c;
            let mut out = vec![0u8; height * stride];
            for (y, out_row) in out.chunks_exact_mut(stride).enumerate() {
                let (start, k) = vert.taps(y);
                let start = start - row_shift;
                for (i, o) in out_row.iter_mut().enumerate() {
                    let mut acc = 1i32 << (PRECISION_BITS - 1);
                    for (j, &w) in k.iter().enumerate() {
                        acc += cur.data[(start + j) * stride + i] as i32 * w;
                    }
                    *o = clip8(acc);
                }
            }
            cur = Image {
                width,
                height,
                channels: c,
                data: out,
            };
        }
        Ok(cur)
    }

    /// Scales so the shorter side becomes `size`, keeping the aspect ratio with torchvision's
    /// rounding (`int(size * long / short)`); a no-op when the shorter side already matches.
    pub fn resize_shorter(&self, size: usize) -> Result<Image> {
        let (w, h) = (self.width, self.height);
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        if short == size || short == 0 {
            return Ok(self.clone());
        }
        let new_long = (size as f64 * long as f64 / short as f64) as usize;
        if w <= h {
            self.resize(size, new_long)
        } else {
            self.resize(new_long, size)
        }
    }

    /// The centred `width` x `height` window, as torchvision's `center_crop`: offsets are
    /// rounded half-to-even and a crop larger than the image is padded with zeros.
    pub fn center_crop(&self, width: usize, height: usize) -> Result<Image> {
        check_size(width, height, self.channels)?;
        let left = crop_offset(self.width, width);
        let top = crop_offset(self.height, height);
        let c = self.channels;
        let mut data = vec![0u8; width * height * c];
        for (y, row) in data.chunks_exact_mut(width * c).enumerate() {
            let sy = y as i64 + top;
            if sy < 0 || sy >= self.height as i64 {
                continue;
            }
            for (x, px) in row.chunks_exact_mut(c).enumerate() {
                let sx = x as i64 + left;
                if sx < 0 || sx >= self.width as i64 {
                    continue;
                }
                let at = (sy as usize * self.width + sx as usize) * c;
                px.copy_from_slice(&self.data[at..at + c]);
            }
        }
        Ok(Image {
            width,
            height,
            channels: c,
            data,
        })
    }

    /// Samples as f32 in planar CHW order, unscaled (0..=255).
    pub fn to_chw_f32(&self) -> Vec<f32> {
        let c = self.channels;
        let plane = self.width * self.height;
        let mut out = vec![0f32; plane * c];
        for (i, px) in self.data.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                out[ch * plane + i] = v as f32;
            }
        }
        out
    }
}

fn check_size(width: usize, height: usize, channels: usize) -> Result<()> {
    match width
        .checked_mul(height)
        .and_then(|p| p.checked_mul(channels))
    {
        Some(n) if n <= MAX_IMAGE_BYTES => Ok(()),
        _ => Err(Error::TooLarge(format!(
            "a {width}x{height} image exceeds the {MAX_IMAGE_BYTES} byte limit"
        ))),
    }
}

/// Source offset of a centred crop; negative when the crop is wider than the source.
fn crop_offset(src: usize, crop: usize) -> i64 {
    if crop > src {
        // torchvision pads (crop - src) / 2 on the leading side, rounding down.
        -(((crop - src) / 2) as i64)
    } else {
        let d = src - crop;
        // round(d / 2.0) with Python's round-half-to-even.
        let half = d / 2;
        (if d % 2 == 1 && half % 2 == 1 {
            half + 1
        } else {
            half
        }) as i64
    }
}

/// Pillow's fixed-point precision for 8-bit resampling: 32 bits minus 8 for the sample and 2
/// for headroom from negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn clip8(acc: i32) -> u8 {
    if acc >= 1 << (PRECISION_BITS + 8) {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

/// Per-output-pixel filter taps along one axis (Pillow's `precompute_coeffs` followed by
/// `normalize_coeffs_8bpc`).
struct Coeffs {
    /// (first source index, tap count) per output index.
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

impl Coeffs {
    fn new(in_size: usize, out_size: usize) -> Coeffs {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filterscale; // the bilinear filter's support is 1
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut w = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // Truncation toward zero, as C's (int) cast in Pillow.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin).min(ksize);
            let mut total = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(n) {
                let t = ((x + xmin) as f64 - center + 0.5) * ss;
                *wx = (1.0 - t.abs()).max(0.0);
                total += *wx;
            }
            for (x, wx) in w.iter().enumerate().take(n) {
                let v = if total != 0.0 { wx / total } else { *wx };
                let fixed = v * (1u32 << PRECISION_BITS) as f64;
                weights[xx * ksize + x] = if v < 0.0 {
                    (fixed - 0.5) as i32
                } else {
                    (fixed + 0.5) as i32
                };
            }
            bounds.push((xmin, n));
        }
        Coeffs {
            bounds,
            ksize,
            weights,
        }
    }

    fn taps(&self, out_index: usize) -> (usize, &[i32]) {
        let (start, n) = self.bounds[out_index];
        (start, &self.weights[out_index * self.ksize..][..n])
    }
}

/// Reads a PNG or JPEG file (chosen by content, not extension).
pub fn read_image(path: impl AsRef<Path>) -> Result<Image> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, &path.display().to_string())
}

/// Decodes PNG or JPEG bytes into gray or RGB; `name` identifies the source in errors.
///
/// PNG: any bit depth and colour type; 16-bit samples keep their high byte, palettes are
/// expanded, alpha is dropped (not composited, as Pillow's `convert("RGB")`).
/// JPEG: gray, RGB/YCbCr and CMYK/YCCK (converted to RGB as Pillow does).
pub fn decode_image(bytes: &[u8], name: &str) -> Result<Image> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        decode_png(bytes, name)
    } else if bytes.starts_with(&[0xff, 0xd8]) {
        decode_jpeg(bytes, name)
    } else {
        Err(Error::Data(format!(
            "{name}: not a PNG or JPEG file (unrecognised signature)"
        )))
    }
}

fn decode_png(bytes: &[u8], name: &str) -> Result<Image> {
    let err = |msg: String| Error::Data(format!("{name}: bad PNG: {msg}"));
    let mut decoder = png::Decoder::new_with_limits(
        Cursor::new(bytes),
        png::Limits {
            bytes: MAX_IMAGE_BYTES,
        },
    );
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| err(e.to_string()))?;
    let size = reader
        .output_buffer_size()
        .filter(|&s| s <= MAX_IMAGE_BYTES)
        .ok_or_else(|| Error::TooLarge(format!("{name}: image is too large to decode")))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| err(e.to_string()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let in_ch = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err(err("palette was not expanded".into())),
    };
    if info.bit_depth != png::BitDepth::Eight {
        return Err(err(format!("unexpected output depth {:?}", info.bit_depth)));
    }
    let out_ch = if in_ch <= 2 { 1 } else { 3 };
    let line = info.line_size;
    if line < w * in_ch || buf.len() < line * h {
        return Err(err("decoder returned a short buffer".into()));
    }
    let mut data = Vec::with_capacity(w * h * out_ch);
    for row in buf.chunks_exact(line).take(h) {
        for px in row[..w * in_ch].chunks_exact(in_ch) {
            data.extend_from_slice(&px[..out_ch]);
        }
    }
    Image::new(w, h, out_ch, data).map_err(|e| err(e.to_string()))
}

fn decode_jpeg(bytes: &[u8], name: &str) -> Result<Image> {
    let err = |msg: String| Error::Data(format!("{name}: bad JPEG: {msg}"));
    // jpeg-decoder has a few `panic!`s on inputs its parser lets through; a bad file must
    // stay an error, so contain them.
    let decoded = std::panic::catch_unwind(|| {
        let mut d = jpeg_decoder::Decoder::new(Cursor::new(bytes));
        d.set_max_decoding_buffer_size(MAX_IMAGE_BYTES);
        let pixels = d.decode()?;
        Ok::<_, jpeg_decoder::Error>((pixels, d.info()))
    })
    .map_err(|_| err("the decoder failed on malformed data".into()))?;
    let (pixels, info) = decoded.map_err(|e| err(e.to_string()))?;
    let info = info.ok_or_else(|| err("no frame header".into()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    use jpeg_decoder::PixelFormat;
    let (channels, data) = match info.pixel_format {
        PixelFormat::L8 => (1, pixels),
        // 16-bit samples come out in native byte order; keep the most significant byte.
        PixelFormat::L16 => (
            1,
            pixels
                .chunks_exact(2)
                .map(|c| (u16::from_ne_bytes([c[0], c[1]]) >> 8) as u8)
                .collect(),
        ),
        PixelFormat::RGB24 => (3, pixels),
        PixelFormat::CMYK32 => (3, pixels.chunks_exact(4).flat_map(cmyk_to_rgb).collect()),
    };
    Image::new(w, h, channels, data).map_err(|e| err(e.to_string()))
}

/// Pillow's `cmyk2rgb`: each channel is (255 - K) scaled by (255 - ink), rounded as
/// Pillow's MULDIV255.
fn cmyk_to_rgb(p: &[u8]) -> [u8; 3] {
    let nk = 255 - p[3] as i32;
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let ch = |ink: u8| (nk - muldiv255(ink as i32, nk)).clamp(0, 255) as u8;
    [ch(p[0]), ch(p[1]), ch(p[2])]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::npy::read_npy;
    use crate::data::test_util::{fixture, shared_dir};
    use crate::ir::TensorData;

    fn npy_u8(name: &str) -> (Vec<usize>, Vec<u8>) {
        let t = read_npy(fixture(name)).unwrap();
        let shape = t.shape().to_vec();
        match t.into_data() {
            TensorData::U8(v) => (shape, v),
            other => panic!("{name}: {:?}", other.dtype()),
        }
    }

    #[test]
    fn png_colour_types_and_depths() {
        for (png, npy, channels) in [
            ("rgba16.png", "rgba16_rgb.npy", 3),
            ("gray16.png", "gray16_gray.npy", 1),
            ("gray1.png", "gray1_gray.npy", 1),
            ("gray_alpha.png", "gray_alpha_gray.npy", 1),
            ("palette4.png", "palette4_rgb.npy", 3),
            ("rgb_37x23.png", "resize_13x40.npy", 3),
        ] {
            let img = read_image(fixture(png)).unwrap();
            assert_eq!(img.channels, channels, "{png}");
            if png == "rgb_37x23.png" {
                assert_eq!((img.width, img.height), (37, 23));
                continue;
            }
            let (shape, want) = npy_u8(npy);
            assert_eq!((img.height, img.width), (shape[0], shape[1]), "{png}");
            assert_eq!(img.data, want, "{png}");
        }
    }

    #[test]
    fn jpeg_gray_and_cmyk_match_pillow_closely() {
        for (jpg, npy, channels) in [
            ("gray.jpg", "gray_jpg.npy", 1),
            ("cmyk.jpg", "cmyk_rgb.npy", 3),
        ] {
            let img = read_image(fixture(jpg)).unwrap();
            let (shape, want) = npy_u8(npy);
            assert_eq!(img.channels, channels, "{jpg}");
            assert_eq!((img.height, img.width), (shape[0], shape[1]), "{jpg}");
            // Different IDCT and upsampling from libjpeg: a few levels apart at most.
            let max_diff = img
                .data
                .iter()
                .zip(&want)
                .map(|(&a, &b)| (a as i32 - b as i32).abs())
                .max()
                .unwrap();
            assert!(max_diff <= 3, "{jpg}: max diff {max_diff}");
        }
    }

    #[test]
    fn resize_is_bit_exact_with_pillow() {
        let img = read_image(fixture("rgb_37x23.png")).unwrap();
        for (w, h) in [(25, 16), (48, 30), (13, 40)] {
            let (_, want) = npy_u8(&format!("resize_{w}x{h}.npy"));
            assert_eq!(img.resize(w, h).unwrap().data, want, "{w}x{h}");
        }
        let gray = img.to_gray();
        assert_eq!(gray.data, npy_u8("gray_37x23.npy").1);
        assert_eq!(
            gray.resize(9, 7).unwrap().data,
            npy_u8("resize_gray_9x7.npy").1
        );
    }

    #[test]
    fn shorter_side_and_crop_geometry() {
        let img = Image::new(37, 23, 1, vec![0; 37 * 23]).unwrap();
        let r = img.resize_shorter(16).unwrap();
        assert_eq!((r.width, r.height), (25, 16));
        assert_eq!(img.resize_shorter(23).unwrap(), img);
        // torchvision: round((25 - 12) / 2) = round(6.5) = 6, round((16 - 12) / 2) = 2.
        assert_eq!(crop_offset(25, 12), 6);
        assert_eq!(crop_offset(27, 12), 8); // round(7.5) = 8
        assert_eq!(crop_offset(16, 12), 2);
        assert_eq!(crop_offset(37, 40), -1);
        let px = Image::new(3, 2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        // round(0.5) = 0 vertically; padding goes right when the excess is odd.
        assert_eq!(px.center_crop(1, 1).unwrap().data, vec![2]);
        assert_eq!(
            px.center_crop(4, 2).unwrap().data,
            vec![1, 2, 3, 0, 4, 5, 6, 0]
        );
        assert_eq!(
            px.center_crop(5, 2).unwrap().data,
            vec![0, 1, 2, 3, 0, 0, 4, 5, 6, 0]
        );
    }

    #[test]
    fn degenerate_sizes_do_not_panic() {
        let img = Image::new(1, 1, 3, vec![10, 20, 30]).unwrap();
        assert_eq!(img.resize(3, 2).unwrap().data, [10, 20, 30].repeat(6));
        assert_eq!(img.resize(0, 5).unwrap().data.len(), 0);
        let empty = Image::new(0, 0, 1, vec![]).unwrap();
        assert_eq!(empty.resize(2, 2).unwrap().data, vec![0; 4]);
        assert_eq!(empty.center_crop(2, 1).unwrap().data, vec![0; 2]);
        assert!(Image::new(2, 2, 3, vec![0; 5]).is_err());
        assert!(Image::new(usize::MAX, 2, 3, vec![]).is_err());
        assert!(img.resize(1 << 20, 1 << 20).is_err());
        let tall = Image::new(1, 1000, 1, vec![0; 1000]).unwrap();
        assert!(tall.resize_shorter(1 << 15).is_err());
        assert!(img.center_crop(usize::MAX, 2).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let png = std::fs::read(fixture("rgb_37x23.png")).unwrap();
        let jpg = std::fs::read(fixture("cmyk.jpg")).unwrap();
        for src in [&png, &jpg] {
            for n in (0..src.len()).step_by(5) {
                let e = decode_image(&src[..n], "cut.img");
                if let Err(e) = e {
                    assert!(e.to_string().contains("cut.img"), "{e}");
                }
            }
            for i in (0..src.len()).step_by(11) {
                let mut bad = src.clone();
                bad[i] ^= 0x5a;
                let _ = decode_image(&bad, "flip.img");
            }
        }
        let e = decode_image(b"GIF89a", "x.gif").unwrap_err().to_string();
        assert!(e.contains("x.gif"), "{e}");
    }

    #[test]
    fn decodes_shared_images() {
        let Some(shared) = shared_dir("decodes_shared_images") else {
            return;
        };
        let small = read_image(shared.join("images/small/mnist_03_0.png")).unwrap();
        assert_eq!((small.width, small.height, small.channels), (28, 28, 1));
        let cifar = read_image(shared.join("images/small/cifar10_00_3.png")).unwrap();
        assert_eq!((cifar.width, cifar.height, cifar.channels), (32, 32, 3));
        // Sizes and mean levels from Pillow (JPEG decoders differ by a level or two).
        for (file, w, h, c, mean) in [
            ("photos/chelsea.png", 451, 300, 3, 115.30514166050752),
            ("photos/rocket.jpg", 640, 427, 3, 65.27705893832943),
            (
                "photos/hubble_deep_field.jpg",
                1000,
                872,
                3,
                19.15445374617737,
            ),
            ("photos/page.png", 384, 191, 1, 171.54482984293193),
        ] {
            let img = read_image(shared.join("images").join(file)).unwrap();
            assert_eq!((img.width, img.height, img.channels), (w, h, c), "{file}");
            let m = img.data.iter().map(|&v| v as f64).sum::<f64>() / img.data.len() as f64;
            assert!((m - mean).abs() < 0.05, "{file}: mean {m}, Pillow {mean}");
        }
    }
}
