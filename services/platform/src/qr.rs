//! QR codes of otpauth URIs as PNG images, for an authenticator app to scan.

use anyhow::Context;
use qrcode::{Color, EcLevel, QrCode};

/// Pixels per module, and the quiet zone in modules that readers need.
const SCALE: usize = 8;
const QUIET: usize = 4;

pub fn png(data: &str) -> anyhow::Result<Vec<u8>> {
    let code = QrCode::with_error_correction_level(data.as_bytes(), EcLevel::M)
        .context("the data does not fit a QR code")?;
    let modules = code.width();
    let side = (modules + 2 * QUIET) * SCALE;
    let colors = code.to_colors();
    let mut pixels = vec![255u8; side * side];
    for (i, color) in colors.iter().enumerate() {
        if *color == Color::Dark {
            let (mx, my) = (i % modules + QUIET, i / modules + QUIET);
            for y in my * SCALE..(my + 1) * SCALE {
                pixels[y * side + mx * SCALE..y * side + (mx + 1) * SCALE].fill(0);
            }
        }
    }
    let mut out = Vec::new();
    {
        let side = u32::try_from(side).context("QR code too large")?;
        let mut encoder = png::Encoder::new(&mut out, side, side);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().context("writing the PNG header")?;
        writer
            .write_image_data(&pixels)
            .context("writing the PNG image")?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_png_comes_out() {
        let png = super::png("otpauth://totp/Acme:alice?secret=ABC&issuer=Acme").unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
