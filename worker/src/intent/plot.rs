//! The confusion matrix as a PNG heatmap, drawn with plotters' bitmap backend
//! and encoded with the pure-Rust `png` crate: no system fonts or libraries.
//!
//! Rows are true labels, columns predicted labels, both in the order of
//! `confusion_matrix.json`. Each cell's colour is its share of the row:
//! blue on the diagonal (right), red off it (confusions; square-root scale so that
//! rare confusions stay visible). Two gradient bars on the right are the legend
//! (top: 0 → 100% correct, bottom: 0 → 100% confused). No text is drawn.

use plotters::prelude::*;

use super::metrics::ConfusionMatrix;

const MARGIN: u32 = 16;
const LEGEND: u32 = 40;

fn mix(a: (u8, u8, u8), b: (u8, u8, u8), t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let m = |x: u8, y: u8| (f64::from(x) + (f64::from(y) - f64::from(x)) * t).round() as u8;
    RGBColor(m(a.0, b.0), m(a.1, b.1), m(a.2, b.2))
}

const WHITE: (u8, u8, u8) = (255, 255, 255);
const BLUE: (u8, u8, u8) = (8, 48, 107);
const RED: (u8, u8, u8) = (165, 15, 21);

/// Cell colour: `share` of its row, on or off the diagonal.
pub fn cell_color(share: f64, diagonal: bool) -> RGBColor {
    if share <= 0.0 {
        return RGBColor(WHITE.0, WHITE.1, WHITE.2);
    }
    if diagonal {
        mix(WHITE, BLUE, 0.15 + 0.85 * share)
    } else {
        mix(WHITE, RED, 0.2 + 0.8 * share.sqrt())
    }
}

/// Renders the heatmap; returns the PNG bytes.
pub fn confusion_png(cm: &ConfusionMatrix) -> Result<Vec<u8>, String> {
    let n = cm.labels.len().max(1) as u32;
    let cell = (900 / n).clamp(2, 40);
    let side = n * cell;
    let (w, h) = (side + 2 * MARGIN + LEGEND, side + 2 * MARGIN);
    let mut rgb = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<_>| format!("failed to draw the confusion matrix: {e:?}");
        root.fill(&WHITE_COLOR).map_err(e)?;
        for (i, row) in cm.matrix.iter().enumerate() {
            let total: usize = row.iter().sum();
            for (j, &c) in row.iter().enumerate() {
                if c == 0 {
                    continue;
                }
                let share = c as f64 / total.max(1) as f64;
                let (x, y) = ((MARGIN + j as u32 * cell) as i32, (MARGIN + i as u32 * cell) as i32);
                root.draw(&Rectangle::new([(x, y), (x + cell as i32, y + cell as i32)], cell_color(share, i == j).filled())).map_err(e)?;
            }
        }
        // Frame and legend bars.
        let (a, b) = (MARGIN as i32 - 1, (MARGIN + side) as i32);
        root.draw(&Rectangle::new([(a, a), (b, b)], RGBColor(120, 120, 120))).map_err(e)?;
        let lx = (MARGIN * 2 + side) as i32;
        let half = side as i32 / 2 - 4;
        for k in 0..half {
            let t = f64::from(k) / f64::from(half.max(1));
            let y_top = MARGIN as i32 + half - k;
            root.draw(&Rectangle::new([(lx, y_top), (lx + 16, y_top + 1)], cell_color(t.max(1e-3), true).filled())).map_err(e)?;
            let y_bot = MARGIN as i32 + 2 * half + 8 - k;
            root.draw(&Rectangle::new([(lx, y_bot), (lx + 16, y_bot + 1)], cell_color(t.max(1e-3), false).filled())).map_err(e)?;
        }
        root.present().map_err(e)?;
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| format!("failed to encode PNG: {e}"))?;
        writer.write_image_data(&rgb).map_err(|e| format!("failed to encode PNG: {e}"))?;
    }
    Ok(out)
}

const WHITE_COLOR: RGBColor = RGBColor(255, 255, 255);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_png() {
        let cm = ConfusionMatrix {
            labels: vec!["a".into(), "b".into(), "oos".into()],
            matrix: vec![vec![5, 1, 0], vec![0, 6, 0], vec![2, 0, 3]],
        };
        let png = confusion_png(&cm).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let dec = png::Decoder::new(std::io::Cursor::new(png));
        let reader = dec.read_info().unwrap();
        let info = reader.info();
        assert_eq!((info.width, info.height), (3 * 40 + 2 * MARGIN + LEGEND, 3 * 40 + 2 * MARGIN));
        assert_eq!(cell_color(0.0, true), RGBColor(255, 255, 255));
        assert_ne!(cell_color(0.5, false), cell_color(0.5, true));
    }
}
