"""The end-to-end pipeline on one task: demonstrations to a results report.

    collect -> for each training seed s (seed_<s>/): one training stage per policy kind
            -> one evaluation stage per evaluation -> latency (every evaluation's policy
            timed in turn) -> video -> report (mean and 95% interval over the seeds)

The policy kinds and their evaluations come from the registry (vdd_ros/policies.py). The
package is split into `config` (PipelineConfig, config/pipeline.yaml), `runner` (cached,
resumable, locked stages), `stages` (the stage graph and what each stage does), `media`
(latency bench, GIF) and `tune` (candidate settings scored on validation seeds).

Everything goes under `<results>/<task>/`. Robosuite, ROS and matplotlib are imported only
by the stages that need them.

On the user's dataset (`dataset`, `vdd-ros pipeline --dataset F.hdf5`): under
`<results>/<file stem>/`, a `dataset` stage imports the file (its observation keys and filter
key applied, its train/valid split kept) in place of `collect`; every policy is evaluated in
process in the robosuite environment the file's `env_args` describe (sim/robosuite_env.py),
for `horizon` control steps (default: the longest demonstration), with success from the
environment's own check and no behaviour modes.

Via bags (`via_bags`, `vdd-ros pipeline --via-bags`): the same job with everything over
standard ROS 2 messages, under `<results>/via_bags/<task>/` (its own summary.md there):

    record -> bag2dataset -> seed_<s>/teacher -> ... (as above)

- `record`: sim_node (lockstep, the task's shipped binding config/bindings/<task>.yaml) and
  the scripted demonstrator as policy_node (act_on complete) run on a private ROS domain
  and `vdd-ros record`'s recorder writes what they publish into MCAP bags
  (`bags/round_<k>`), the way teleoperation on a real robot is recorded. Seeds and rounds are
  those of `collect`: `collect_seed` onwards, each round asking for as many episodes as
  demonstrations are still missing, up to 2 x demos + 10 attempts.
- `bag2dataset`: the bags become demos.hdf5 through the binding (failed episodes dropped by
  their end markers), so training reads what the recorder wrote, never the simulator.
- The teacher and the VDD-MoE are evaluated through sim_node and policy_node over the
  binding (JointState / PoseStamped in, TwistStamped / Float64MultiArray out, lockstep, act_on
  complete, sim time); the other policies in-process; the evaluation seeds are the native
  pipeline's. The report says so and, when the native pipeline's evaluations exist, puts
  native and via-bags success side by side.
"""
from vdd_ros.pipeline.config import (PipelineConfig, default_config_path, describe_config,
                                     flatten, load_pipeline_config)
from vdd_ros.pipeline.media import pick_mode_episodes, query_latencies, render_mode_gif
from vdd_ros.pipeline.runner import (Context, Stage, marker_path, read_marker,
                                     remove_stale_temporaries, results_root, run_stages,
                                     seed_dir, stage_key, task_lock)
from vdd_ros.pipeline.stages import GIF_NAME, build_stages, dataset_source, run_pipeline

__all__ = ['GIF_NAME', 'Context', 'PipelineConfig', 'Stage', 'build_stages', 'dataset_source',
           'default_config_path', 'describe_config', 'flatten', 'load_pipeline_config',
           'marker_path', 'pick_mode_episodes', 'query_latencies', 'read_marker',
           'remove_stale_temporaries', 'render_mode_gif', 'results_root', 'run_pipeline',
           'run_stages', 'seed_dir', 'stage_key', 'task_lock']
