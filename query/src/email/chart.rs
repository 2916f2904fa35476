//! Charts of an e-mail report, drawn server-side to PNG (mail clients show no
//! scripts and few show SVG). They hold no text: labels are in the HTML beside
//! them, where Arabic is shaped and set right to left by the reader's client.

use plotters::prelude::*;

use super::EmailError;

/// Width and height of a chart, in pixels.
pub const SIZE: (u32, u32) = (640, 220);
const BARS: RGBColor = RGBColor(15, 110, 140);
const COMPARED: RGBColor = RGBColor(224, 122, 31);
const GRID: RGBColor = RGBColor(226, 230, 234);

fn chart_error(e: impl std::fmt::Display) -> EmailError {
    EmailError::Chart(e.to_string())
}

/// Bars of `values` (one per row, in order; right to left when `rtl`), with `compared` drawn
/// as a line over them where given: a PNG.
pub fn bars(values: &[u64], compared: Option<&[Option<u64>]>, rtl: bool) -> Result<Vec<u8>, EmailError> {
    let (w, h) = SIZE;
    let mut pixels = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        let n = values.len().max(1) as u32;
        let most = values
            .iter()
            .copied()
            .chain(compared.unwrap_or_default().iter().flatten().copied())
            .max()
            .unwrap_or(0)
            .max(1);
        let top = most + most / 10 + 1;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .build_cartesian_2d(0u32..n * 4, 0u64..top)
            .map_err(chart_error)?;
        // four light lines across, at quarters of the tallest bar
        for q in 1..=4u64 {
            let y = most * q / 4;
            chart
                .draw_series(std::iter::once(PathElement::new(vec![(0, y), (n * 4, y)], GRID)))
                .map_err(chart_error)?;
        }
        let slot = |i: usize| if rtl { n - 1 - i as u32 } else { i as u32 };
        chart
            .draw_series(values.iter().enumerate().map(|(i, &v)| {
                let x = slot(i) * 4;
                Rectangle::new([(x + 1, 0), (x + 3, v)], BARS.filled())
            }))
            .map_err(chart_error)?;
        if let Some(compared) = compared {
            let points: Vec<(u32, u64)> = compared
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.map(|v| (slot(i) * 4 + 2, v)))
                .collect();
            chart
                .draw_series(LineSeries::new(points, COMPARED.stroke_width(3)))
                .map_err(chart_error)?;
        }
        root.present().map_err(chart_error)?;
    }
    let mut png_bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png_bytes, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(chart_error)?;
        writer.write_image_data(&pixels).map_err(chart_error)?;
    }
    Ok(png_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_a_png_of_its_size_and_depends_on_the_numbers() {
        let png = bars(&[3, 9, 4], Some(&[Some(2), None, Some(5)]), false).expect("chart");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let decoder = png::Decoder::new(std::io::Cursor::new(&png));
        let reader = decoder.read_info().expect("png");
        assert_eq!((reader.info().width, reader.info().height), SIZE);
        assert_ne!(png, bars(&[3, 9, 5], None, false).expect("chart"));
        assert_ne!(
            png,
            bars(&[3, 9, 4], Some(&[Some(2), None, Some(5)]), true).expect("chart")
        );
        assert!(bars(&[], None, false).is_ok(), "an empty period draws an empty chart");
    }
}
