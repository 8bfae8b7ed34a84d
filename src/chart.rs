//! A small SVG line chart with logarithmic axes, for the benchmark examples' figures.

use std::fmt::Write;

/// One line of a chart: its label and `(x, y)` points (non-positive values are skipped).
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Axis titles and the chart's title.
#[derive(Debug, Clone)]
pub struct Axes<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    /// Unit written after each y tick (`1e3 bytes/s`).
    pub y_unit: &'a str,
}

const COLORS: [&str; 8] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
];

/// Escapes text for SVG.
pub fn xml_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A log2(x) – log10(y) chart of `series`.
pub fn loglog_svg(series: &[Series], axes: &Axes) -> String {
    let (w, h, left, right, top, bottom) = (820.0, 480.0, 90.0, 250.0, 40.0, 60.0);
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" \
         fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        (w - right + left) / 2.0,
        xml_text(axes.title)
    );
    let valid = |p: &&(f64, f64)| p.0 > 0.0 && p.1 > 0.0 && p.0.is_finite() && p.1.is_finite();
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|l| l.points.iter().filter(valid).copied())
        .collect();
    if all.is_empty() {
        s.push_str("</svg>\n");
        return s;
    }
    let fold = |f: fn(&(f64, f64)) -> f64| {
        all.iter()
            .map(f)
            .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)))
    };
    let ((xmin, xmax), (ymin, ymax)) = (fold(|p| p.0), fold(|p| p.1));
    let (lx0, lx1) = (
        xmin.log2().floor(),
        xmax.log2().ceil().max(xmin.log2().floor() + 1.0),
    );
    let (ly0, ly1) = (
        ymin.log10().floor(),
        ymax.log10().ceil().max(ymin.log10().floor() + 1.0),
    );
    let px = |x: f64| left + (x.log2() - lx0) / (lx1 - lx0) * (w - left - right);
    let py = |y: f64| h - bottom - (y.log10() - ly0) / (ly1 - ly0) * (h - top - bottom);
    for e in (lx0 as i64)..=(lx1 as i64) {
        let x = px(2f64.powi(e as i32));
        let _ = writeln!(
            s,
            "<line x1=\"{x}\" y1=\"{top}\" x2=\"{x}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{x}\" \
             y=\"{}\" text-anchor=\"middle\">2^{e}</text>",
            h - bottom,
            h - bottom + 18.0
        );
    }
    for e in (ly0 as i64)..=(ly1 as i64) {
        let y = py(10f64.powi(e as i32));
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/><text x=\"{}\" \
             y=\"{}\" text-anchor=\"end\">1e{e} {}</text>",
            w - right,
            left - 6.0,
            y + 4.0,
            xml_text(axes.y_unit)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n<text x=\"16\" y=\"{}\" \
         transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">{}</text>",
        (w - right + left) / 2.0,
        h - 15.0,
        xml_text(axes.x),
        (h - bottom + top) / 2.0,
        (h - bottom + top) / 2.0,
        xml_text(axes.y)
    );
    for (i, line) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let mut pts: Vec<(f64, f64)> = line
            .points
            .iter()
            .filter(valid)
            .map(|&(x, y)| (px(x), py(y)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let joined: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>",
            joined.join(" ")
        );
        for (x, y) in &pts {
            let _ = writeln!(
                s,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{c}\"/>"
            );
        }
        let ly = top + 20.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"3\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            w - right + 15.0,
            w - right + 40.0,
            w - right + 46.0,
            ly + 4.0,
            xml_text(&line.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_polyline_per_series_and_escaped_labels() {
        let series = vec![
            Series {
                label: "a<b".into(),
                points: vec![(1024.0, 10.0), (2048.0, 20.0), (4096.0, 0.0)],
            },
            Series {
                label: "c".into(),
                points: vec![(1024.0, 5.0)],
            },
        ];
        let axes = Axes {
            title: "t",
            x: "x",
            y: "y",
            y_unit: "",
        };
        let svg = loglog_svg(&series, &axes);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"));
        // The zero is skipped: two circles on the first line, one on the second.
        assert_eq!(svg.matches("<circle").count(), 3);
    }
}
