//! The official subnets give the same logits on 1, 2 and 3 threads: every parallel split of the engine (pixel and
//! column ranges of the 1x1 convs, row ranges of the depthwise convs, query blocks of attention, the partial sums
//! of layer norm and channel means) covers its work exactly once.

use nasvit_infer::{random_state_dict, Engine, EngineOptions, ExportedModel, SearchSpace, Tensor};

#[test]
fn official_subnets_agree_across_thread_counts() {
    let space = SearchSpace::builtin("official").unwrap();
    let sd = random_state_dict(&space, 3);
    for (mut arch, res) in [(space.min_arch(), 192), (space.max_arch(), 192)] {
        arch.resolution = res;
        let model = ExportedModel::from_state_dict(&sd, &space, &arch).unwrap();
        let mut rng = nasvit_infer::state::SplitMix::new(7);
        let x = Tensor::new(
            vec![1, 3, res, res],
            (0..3 * res * res).map(|_| rng.uniform() - 0.5).collect(),
        );
        let one = Engine::new(&model, EngineOptions::with_threads(1))
            .unwrap()
            .run(&x)
            .unwrap();
        let spread = one.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(spread > 0.0 && one.data.iter().all(|v| v.is_finite()));
        for threads in [2, 3] {
            let got = Engine::new(&model, EngineOptions::with_threads(threads))
                .unwrap()
                .run(&x)
                .unwrap();
            for (a, b) in one.data.iter().zip(&got.data) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + spread),
                    "{threads} threads, res {res}: {a} vs {b}"
                );
            }
        }
    }
}
