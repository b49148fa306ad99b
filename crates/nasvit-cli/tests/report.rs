//! `nasvit report` on a demo folder written here: the HTML parses as XML and holds every part (training curves,
//! the search plot with the chosen subnets, the models table, the sample images inline, the conflict table).

use std::path::Path;
use std::process::Command;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    std::fs::write(path, text).expect("write");
}

/// A valid 1x1 grey PNG.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x3a, 0x7e, 0x9b, 0x55, 0x00, 0x00, 0x00, 0x0a, 0x49,
    0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x68, 0x00, 0x00, 0x00, 0x82, 0x00, 0x81, 0x77, 0xcd, 0x72, 0xb6, 0x00, 0x00,
    0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

#[test]
fn the_report_of_a_demo_folder_has_every_part() {
    let dir = std::env::temp_dir().join(format!("nasvit-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut metrics = String::from("{\"kind\":\"start\",\"batch_size\":128}\n");
    for step in (20..=200).step_by(20) {
        metrics += &format!(
            "{{\"kind\":\"train\",\"step\":{step},\"loss\":{{\"max\":{},\"min\":{}}},\"images_per_s\":200.0,\"wall_s\":{}}}\n",
            2.0 - step as f64 / 200.0,
            1.5 - step as f64 / 300.0,
            step as f64 * 0.6
        );
    }
    for step in [100, 200] {
        metrics += &format!(
            "{{\"kind\":\"eval\",\"step\":{step},\"top1_max_recal\":{},\"top1_min_recal\":{}}}\n",
            70.0 + step as f64 / 10.0,
            60.0 + step as f64 / 10.0
        );
    }
    write(&dir.join("train/metrics.jsonl"), &metrics);
    let arch = r#"{"resolution":24,"width":[8,8,16,24,32,40,48,56,128],"depth":[1,1,1,2,2,2,2],"kernel_size":[3,3,3,3,3,3,3],"expand_ratio":[1,3,3,4,4,6,6]}"#;
    let records: Vec<String> = (0..12)
        .map(|i| {
            format!(
                r#"{{"arch":{arch},"mmacs":{},"params":1,"top1":{},"top5":99.0,"loss":0.5,"generation":{}}}"#,
                3.0 + i as f64 * 1.5,
                80.0 + i as f64,
                i / 6
            )
        })
        .collect();
    write(
        &dir.join("search/search_state.json"),
        &format!(r#"{{"records":[{}]}}"#, records.join(",")),
    );
    for i in 0..4 {
        std::fs::create_dir_all(dir.join("images")).expect("dir");
        std::fs::write(dir.join(format!("images/test-{i}.png")), PNG).expect("png");
    }
    let samples: Vec<String> = (0..4)
        .map(|i| {
            format!(
                r#"{{"image":"images/test-{i}.png","true":"coat","pred":"{}","prob":0.9}}"#,
                if i == 2 { "shirt" } else { "coat" }
            )
        })
        .collect();
    let budgets: Vec<String> = [(7.0, 6.0), (12.0, 10.5), (21.3, 19.5)]
        .iter()
        .map(|(b, m)| {
            format!(
                r#"{{"budget_mmacs":{b},"mmacs":{m},"params":500000,"top1":88.5,"top5":99.7,"latency_ms":0.3,"model_dir":"m","search_top1":86.0}}"#
            )
        })
        .collect();
    write(
        &dir.join("summary.json"),
        &format!(
            r#"{{"space":"tiny","train":{{"steps":200,"wall_s":120.0,"images_per_s":213.0}},"budgets":[{}],"test_images":10000,"samples":[{}],"mean_top1_prob":0.9,"notes":["a note"],"total_wall_s":480.0}}"#,
            budgets.join(","),
            samples.join(",")
        ),
    );
    write(
        &dir.join("train/conflict.json"),
        r#"{"overall_negative_share":0.3,"by_layer":[{"name":"blocks.0","negative_share":0.4,"count":10},{"name":"classifier","negative_share":0.2,"count":10}]}"#,
    );

    let out = Command::new(env!("CARGO_BIN_EXE_nasvit"))
        .args(["report", dir.to_str().expect("utf-8")])
        .output()
        .expect("run nasvit");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let html = std::fs::read_to_string(dir.join("report.html")).expect("report.html");
    // self-contained: no scripts, no external resources (the only URLs are XML namespaces)
    assert!(!html.contains("<script"), "no scripts");
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "no external resources"
    );
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(&html, options).expect("well-formed");
    let section = |id: &str| {
        doc.descendants()
            .find(|n| n.tag_name().name() == "section" && n.attribute("id") == Some(id))
            .unwrap_or_else(|| panic!("section {id}"))
    };
    let count = |n: roxmltree::Node, tag: &str| n.descendants().filter(|d| d.tag_name().name() == tag).count();
    // training: the loss chart and the in-run top-1 chart, each with its two curves
    let training = section("training");
    assert_eq!(count(training, "svg"), 2);
    assert_eq!(count(training, "polyline"), 4);
    // search: initial and evolved subnets as points, the front, three budgets and three chosen marks
    let search = section("search");
    assert_eq!(count(search, "circle"), 12);
    assert!(count(search, "polyline") >= 1);
    let texts: Vec<&str> = search
        .descendants()
        .filter(|n| n.is_element())
        .filter_map(|n| n.text())
        .collect();
    assert_eq!(
        texts.iter().filter(|t| t.starts_with("budget ")).count(),
        3,
        "{texts:?}"
    );
    assert!(texts.contains(&"chosen subnets") && texts.contains(&"random (initial population)"));
    // models: a row per budget, the note
    let models = section("models");
    let rows: Vec<_> = models.descendants().filter(|n| n.tag_name().name() == "tr").collect();
    assert_eq!(rows.len(), 1 + 3);
    assert!(models.descendants().any(|n| n.text() == Some("88.50")));
    assert!(models.descendants().any(|n| n.text() == Some("a note")));
    // samples: every image inline, the wrong one marked
    let samples = section("samples");
    let imgs: Vec<_> = samples.descendants().filter(|n| n.tag_name().name() == "img").collect();
    assert_eq!(imgs.len(), 4);
    assert!(imgs.iter().all(|n| n
        .attribute("src")
        .is_some_and(|s| s.starts_with("data:image/png;base64,iVBORw0KGgo"))));
    assert_eq!(
        samples
            .descendants()
            .filter(|n| n.attribute("class") == Some("wrong"))
            .count(),
        1
    );
    // conflicts: one row per layer
    let conflicts = section("conflicts");
    assert_eq!(count(conflicts, "tr"), 1 + 2);
    std::fs::remove_dir_all(&dir).ok();

    // a folder that is neither a demo nor a run is a clear error
    let empty = std::env::temp_dir().join(format!("nasvit-report-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("dir");
    let out = Command::new(env!("CARGO_BIN_EXE_nasvit"))
        .args(["report", empty.to_str().expect("utf-8")])
        .output()
        .expect("run nasvit");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither summary.json"));
    std::fs::remove_dir_all(&empty).ok();
}
