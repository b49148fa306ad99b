//! The distillation losses against the released implementation's numbers and hand-computed values.

use burn::tensor::{Device, Int, Tensor, TensorData};
use nasvit_train::distill::{
    label_smoothing_cross_entropy, soft_probs_cross_entropy, soft_target_cross_entropy, AlphaDivergence,
};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

const KD_KEYS: [&str; 4] = ["kd.student_logits", "kd.teacher_logits", "kd.loss", "kd.grad_student"];
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kd.safetensors");

/// The `tensors.safetensors` files to check: every golden directory under `NASVIT_GOLDEN_DIR` (the
/// variable may name one golden directory or a folder of them), else the committed fixture copy.
fn golden_files() -> Vec<PathBuf> {
    let Ok(dir) = std::env::var("NASVIT_GOLDEN_DIR") else {
        return vec![PathBuf::from(FIXTURE)];
    };
    let dir = PathBuf::from(dir);
    let direct = dir.join("tensors.safetensors");
    if direct.is_file() {
        return vec![direct];
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("NASVIT_GOLDEN_DIR={}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path().join("tensors.safetensors")))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no */tensors.safetensors under NASVIT_GOLDEN_DIR={}",
        dir.display()
    );
    files
}

fn read_f32(st: &SafeTensors, key: &str, file: &Path) -> (Vec<f32>, Vec<usize>) {
    let view = st
        .tensor(key)
        .unwrap_or_else(|e| panic!("{}: {key}: {e}", file.display()));
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{key} must be f32");
    let data = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (data, view.shape().to_vec())
}

fn tensor2(data: Vec<f32>, shape: &[usize], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(data, [shape[0], shape[1]]), device)
}

fn assert_close(name: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= atol + rtol * w.abs(), "{name}[{i}]: got {g}, want {w}");
    }
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("f32 tensor")
}

#[test]
fn alpha_divergence_matches_released_loss_and_gradient() {
    let device = Device::flex().autodiff();
    for file in golden_files() {
        let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let (s, s_shape) = read_f32(&st, "kd.student_logits", &file);
        let (t, t_shape) = read_f32(&st, "kd.teacher_logits", &file);
        let (loss, _) = read_f32(&st, "kd.loss", &file);
        let (grad, _) = read_f32(&st, "kd.grad_student", &file);

        let student = tensor2(s, &s_shape, &device).require_grad();
        let teacher = tensor2(t, &t_shape, &device).require_grad();
        let out = AlphaDivergence::default().forward(student.clone(), teacher.clone());
        let grads = out.loss.backward();
        let got_grad = student.grad(&grads).expect("student gradient");
        assert!(teacher.grad(&grads).is_none(), "the teacher must be detached");

        let name = file.display().to_string();
        assert_close(&format!("{name} kd.loss"), &to_vec(out.loss), &loss, 1e-4, 1e-6);
        assert_close(&format!("{name} kd.grad_student"), &to_vec(got_grad), &grad, 1e-4, 1e-6);
        assert!(
            to_vec(out.divergence).iter().all(|d| *d >= -1e-6),
            "divergences are non-negative"
        );
    }
}

/// Copies only the `kd.*` tensors of the golden directory into the committed fixture.
/// Run: `NASVIT_GOLDEN_DIR=/work/shared/golden/official-mini cargo test -p nasvit-train --test distill -- --ignored`
#[test]
#[ignore]
fn write_kd_fixture() {
    let file = golden_files().into_iter().next().expect("one golden file");
    let bytes = std::fs::read(&file).expect("golden tensors");
    let st = SafeTensors::deserialize(&bytes).expect("golden safetensors");
    let views: Vec<_> = KD_KEYS.iter().map(|k| (*k, st.tensor(k).expect("kd key"))).collect();
    safetensors::serialize_to_file(views, &None, Path::new(FIXTURE)).expect("write fixture");
}

/// With the teacher equal to the student, both divergences are 0 and the tie picks alpha_max (KL), whose
/// surrogate is the cross entropy H(p, q) = H(q): the loss is the entropy and the gradient vanishes.
#[test]
fn alpha_divergence_of_identical_distributions_is_entropy_with_zero_gradient() {
    let device = Device::flex().autodiff();
    let logits = [1.0f32, 2.0, 0.5, -1.0];
    let student = Tensor::<2>::from_data(TensorData::new(logits.to_vec(), [1, 4]), &device).require_grad();
    let teacher = Tensor::<2>::from_data(TensorData::new(logits.to_vec(), [1, 4]), &device);
    let out = AlphaDivergence::default().forward(student.clone(), teacher);
    let z: f32 = logits.iter().map(|l| l.exp()).sum();
    let entropy: f32 = logits.iter().map(|l| l.exp() / z).map(|p| -p * p.ln()).sum();
    assert_close("loss", &to_vec(out.loss.clone()), &[entropy], 1e-5, 1e-6);
    assert_close("picked", &to_vec(out.picked_alpha_min), &[0.0], 0.0, 0.0);
    let grad = student.grad(&out.loss.backward()).expect("gradient");
    assert_close("grad", &to_vec(grad), &[0.0; 4], 0.0, 1e-6);
}

/// Two classes, student q = (0.5, 0.5), teacher p = (0.9, 0.1): the alpha = -1 side
/// (0.5 * (0.5 * 0.5/0.9 + 0.5 * min(0.5/0.1, 5) - 1) = 0.889) beats KL (0.368), so alpha = -1 is picked.
#[test]
fn alpha_divergence_hand_computed_two_class_case() {
    let device = Device::flex().autodiff();
    let student = Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 0.0], [1, 2]), &device).require_grad();
    let teacher = Tensor::<2>::from_data(TensorData::new(vec![(9.0f32).ln(), 0.0], [1, 2]), &device);
    let out = AlphaDivergence::default().forward(student.clone(), teacher);
    // D_{-1} = 0.5 * (sum q * min(q/p, 5) - 1) = 0.5 * (0.5 * 0.5/0.9 + 0.5 * 5 - 1)
    let d_minus = 0.5 * (0.5 * 0.5 / 0.9 + 0.5 * 5.0 - 1.0);
    let kl = 0.9f32 * (0.9f32 / 0.5).ln() + 0.1 * (0.1f32 / 0.5).ln();
    assert!(d_minus > kl);
    assert_close("divergence", &to_vec(out.divergence), &[d_minus], 1e-5, 1e-6);
    assert_close("picked", &to_vec(out.picked_alpha_min), &[1.0], 0.0, 0.0);
    // surrogate = -sum q * (0.5 - min(q/p, 5)) * log q with log q = ln 0.5
    let w = [0.5 * (0.5 - 0.5 / 0.9f32), 0.5 * (0.5 - 5.0f32)];
    let surrogate = -(w[0] + w[1]) * 0.5f32.ln();
    assert_close("loss", &to_vec(out.loss.clone()), &[surrogate], 1e-5, 1e-6);
    // d/dz of -sum_c w_c log_softmax(z)_c = -(w - q * sum w)
    let grad = student.grad(&out.loss.backward()).expect("gradient");
    let sw = w[0] + w[1];
    assert_close(
        "grad",
        &to_vec(grad),
        &[-(w[0] - 0.5 * sw), -(w[1] - 0.5 * sw)],
        1e-5,
        1e-6,
    );
}

/// Logits (0, ln 3) over 2 classes: log q = (ln 1/4, ln 3/4). Label 1, eps 0.1:
/// target = (0.05, 0.95), loss = -(0.05 ln 0.25 + 0.95 ln 0.75).
#[test]
fn label_smoothing_hand_computed() {
    let device = Device::flex();
    let logits = Tensor::<2>::from_data(
        TensorData::new(vec![0.0f32, 3f32.ln(), 3f32.ln(), 0.0], [2, 2]),
        &device,
    );
    let labels = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 1], [2]), &device);
    let loss = label_smoothing_cross_entropy(logits, labels, 0.1);
    let first = -(0.05 * 0.25f32.ln() + 0.95 * 0.75f32.ln());
    let second = -(0.05 * 0.75f32.ln() + 0.95 * 0.25f32.ln());
    assert_close("ls-ce", &to_vec(loss), &[(first + second) / 2.0], 1e-6, 1e-6);
}

#[test]
fn label_smoothing_zero_is_plain_cross_entropy() {
    let device = Device::flex();
    let logits = Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 3f32.ln()], [1, 2]), &device);
    let labels = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64], [1]), &device);
    let loss = label_smoothing_cross_entropy(logits, labels, 0.0);
    assert_close("ce", &to_vec(loss), &[-(0.25f32.ln())], 1e-6, 1e-6);
}

/// Soft targets (0.2, 0.8) against log q = (ln 1/4, ln 3/4); temperature 1 and teacher logits (0, ln 4).
#[test]
fn soft_target_cross_entropy_hand_computed() {
    let device = Device::flex().autodiff();
    let logits = Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 3f32.ln()], [1, 2]), &device).require_grad();
    let teacher = Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 4f32.ln()], [1, 2]), &device).require_grad();
    let want = -(0.2 * 0.25f32.ln() + 0.8 * 0.75f32.ln());
    let loss = soft_target_cross_entropy(logits.clone(), teacher.clone(), 1.0);
    assert_close("soft-ce", &to_vec(loss.clone()), &[want], 1e-6, 1e-6);
    let grads = loss.backward();
    // d/dz = q - p
    assert_close(
        "grad",
        &to_vec(logits.grad(&grads).expect("grad")),
        &[0.05, -0.05],
        1e-5,
        1e-6,
    );
    assert!(teacher.grad(&grads).is_none(), "the teacher must be detached");

    let probs = Tensor::<2>::from_data(TensorData::new(vec![0.2f32, 0.8], [1, 2]), &device);
    let logits = Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 3f32.ln()], [1, 2]), &device);
    assert_close(
        "probs-ce",
        &to_vec(soft_probs_cross_entropy(logits, probs)),
        &[want],
        1e-6,
        1e-6,
    );
}
