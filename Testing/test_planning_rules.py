"""Each planning rule on a tiny hand-made input, with the expected answer worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from AutoSegLib.planning import memory, plan, rules
from AutoSegLib.planning.configure import axis_to_shrink
from AutoSegLib.planning.topology import Topology, features_per_stage, pad_to_divisor, plan_topology


def fingerprint(spacings, shapes, relative_size=1.0, intensity=None) -> dict:
    return {"spacings": [list(s) for s in spacings], "shapes_after_crop": [list(s) for s in shapes],
            "foreground_intensity_properties_per_channel": intensity or {},
            "median_relative_size_after_cropping": relative_size}


MR = {0: "MRI"}
TWO = {"background": 0, "organ": 1}


# -- target spacing and anisotropy --------------------------------------------------------
def test_anisotropic_data_take_the_10th_percentile_out_of_plane():
    # z spacings 2, 4, 6 x 8: median 6 mm = 6x the 1 mm pixels; 10 slices vs 200 pixels = 20x.
    # 10th percentile of 10 values sits 0.9 of the way from the 1st (2) to the 2nd (4): 3.8.
    spacings = [(2.0, 1.0, 1.0), (4.0, 1.0, 1.0)] + [(6.0, 1.0, 1.0)] * 8
    plans = plan(fingerprint(spacings, [(10, 200, 200)] * 10), MR, TWO)
    assert plans.configurations["3d_fullres"].spacing == pytest.approx([3.8, 1.0, 1.0])
    entry = next(e for e in plans.explanation if e["topic"] == "anisotropy")
    assert entry["anisotropic"] and entry["spacing_ratio"] == pytest.approx(6.0)
    assert entry["voxel_ratio"] == pytest.approx(20.0)


def test_coarse_spacing_with_many_slices_is_not_anisotropic():
    # 6x in spacing but only 2x fewer voxels along z: both must exceed 3x, so the median stays.
    spacings = [(2.0, 1.0, 1.0), (4.0, 1.0, 1.0)] + [(6.0, 1.0, 1.0)] * 8
    plans = plan(fingerprint(spacings, [(100, 200, 200)] * 10), MR, TWO)
    assert plans.configurations["3d_fullres"].spacing == pytest.approx([6.0, 1.0, 1.0])


def test_out_of_plane_target_is_never_finer_than_the_other_axes():
    spacings = np.array([(0.5, 1.0, 1.0)] * 2 + [(6.0, 1.0, 1.0)] * 8)
    assert rules.out_of_plane_target(spacings, 0, 1.0) == 1.0
    assert rules.anisotropy(np.array([3.0, 1.0, 1.0]), np.array([10, 200, 200]))["anisotropic"] is False  # = 3x


# -- axis order and the 2D configuration --------------------------------------------------
def test_2d_works_on_the_two_finest_axes():
    # x is the coarse axis (sagittal slices): it goes first and 2D slices are (z, y) planes.
    plans = plan(fingerprint([(1.0, 1.0, 4.0)] * 5, [(60, 50, 12)] * 5), MR, TWO)
    assert plans.transpose_forward == [2, 0, 1] and plans.transpose_backward == [1, 2, 0]
    two_d = plans.configurations["2d"]
    assert two_d.spacing == [1.0, 1.0]
    assert two_d.median_image_size_in_voxels == [60, 50]
    assert plans.configurations["3d_fullres"].spacing == [4.0, 1.0, 1.0]


def test_out_of_plane_axis_stays_first_when_its_target_is_clamped():
    # x: median 6 mm, 10th percentile 0.5 mm, clamped to the 1 mm of the other axes. The target
    # is then isotropic, but x is still the slice axis.
    spacings = [(1.0, 1.0, 0.5)] * 2 + [(1.0, 1.0, 6.0)] * 8
    plans = plan(fingerprint(spacings, [(200, 200, 10)] * 10), MR, TWO)
    assert plans.transpose_forward == [2, 0, 1]
    assert plans.configurations["3d_fullres"].spacing == [1.0, 1.0, 1.0]
    assert plans.configurations["2d"].median_image_size_in_voxels == [200, 200]


def test_isotropic_data_keep_their_axis_order_and_slice_along_the_first():
    plans = plan(fingerprint([(1.0, 1.0, 1.0)] * 5, [(40, 50, 60)] * 5), MR, TWO)
    assert plans.transpose_forward == [0, 1, 2]
    assert plans.configurations["2d"].median_image_size_in_voxels == [50, 60]


# -- topology -----------------------------------------------------------------------------
def test_anisotropic_spacing_pools_in_plane_first_with_flat_kernels():
    topo = plan_topology((4.0, 1.0, 1.0), (16, 128, 128))
    # 1 mm pixels pool alone until 4 mm matches 4 mm; then all axes; z stops at 4 voxels.
    assert topo.strides == ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
    assert topo.kernel_sizes == ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    assert topo.pools_per_axis == (2, 5, 5) and topo.divisor == (4, 32, 32)


def test_pooling_stops_when_axes_would_become_anisotropic_v1_rule():
    # z (8 voxels at 2 mm) stops at 4 voxels; y and x may go one step beyond it (4 vs 8 mm is
    # still within 2x only up to < 8), then all stop although they are 32 voxels long (v1).
    topo = plan_topology((2.0, 1.0, 1.0), (8, 256, 256))
    assert topo.strides == ((1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 2, 2))


def test_pooling_stops_before_a_map_falls_below_4_voxels():
    topo = plan_topology((1.0, 1.0), (36, 36))
    assert topo.pools_per_axis == (3, 3)  # 36 -> 18 -> 9 -> 4.5; a 4.5 map is not halved again
    assert topo.patch_size == (40, 40)


def test_feature_map_sizes_halve_exactly_v1_rule():
    # 30 -> 15 -> 7.5: too small to pool again (v2 rounds 7.5 up to 8 and pools a third time).
    assert plan_topology((1.0, 1.0), (30, 30)).pools_per_axis == (2, 2)


def test_an_axis_too_short_to_pool_holds_the_others_back_v1_rule():
    # 7 voxels never pool, so that axis keeps its 1 mm; the other axis may reach 2 mm but not
    # beyond (that would be 2x anisotropic feature maps). nnU-Net v2 would pool it further.
    topo = plan_topology((1.0, 1.0), (36, 7))
    assert topo.pools_per_axis == (1, 0)
    assert topo.patch_size == (36, 7)


def test_patch_is_padded_to_the_divisor():
    assert pad_to_divisor((115, 320, 232), (16, 32, 32)) == (128, 320, 256)
    assert pad_to_divisor((128, 128), (32, 32)) == (128, 128)


def test_features_double_per_stage_and_are_capped():
    assert features_per_stage(8, 3) == (32, 64, 128, 256, 320, 320, 320, 320)
    assert features_per_stage(8, 2) == (32, 64, 128, 256, 512, 512, 512, 512)


# -- memory -------------------------------------------------------------------------------
def test_memory_estimate_counts_feature_maps_like_v1():
    topo = Topology((1, 1), ((1, 1), (2, 2)), ((3, 3), (3, 3)), (8, 8))
    # Full resolution: 5 maps x 64 px x 32 + (1 input + 2 classes) x 64; bottleneck: 2 x 16 px x 64.
    assert memory.estimate(topo, 32, 1, 2) == 5 * 64 * 32 + 3 * 64 + 2 * 16 * 64


def test_budget_scales_linearly_with_gpu_memory():
    assert memory.budget(3, 32, 8.0) == pytest.approx(520_000_000 * 32 / 30)
    assert memory.budget(3, 32, 16.0) == pytest.approx(2 * memory.budget(3, 32, 8.0))
    assert memory.budget(2, 32, 4.0) == pytest.approx(19_739_648 * 25 / 2)


def test_batch_from_memory_uses_whole_samples_in_3d_and_pairs_in_2d():
    assert memory.batch_from_memory(1000, 480, 3) == 4   # floor(2 x 2.08)
    assert memory.batch_from_memory(1000, 480, 2) == 4   # 2 x floor(2.08)
    assert memory.batch_from_memory(1000, 390, 3) == 5   # floor(2 x 2.56)
    assert memory.batch_from_memory(1000, 390, 2) == 4   # 2 x floor(2.56)
    assert memory.batch_from_memory(1000, 1100, 3) == 2  # never below 2 samples' worth


def test_2d_estimate_uses_30_features_until_the_patch_shrinks_v1_rule():
    # 1,400 x 1,400 pixels do not fit in 2D: the first estimate is for v1's 30-feature
    # reference network, every shrunk candidate for the 32-feature network that is trained.
    plans = plan(fingerprint([(5.0, 0.5, 0.5)] * 10, [(20, 1400, 1400)] * 10), MR, TWO)
    notes = plans.configurations["2d"].explanation
    start = next(e for e in notes if e["topic"] == "patch_start")
    shrinks = [e for e in notes if e["topic"] == "shrink"]
    assert shrinks, "the test needs a 2D patch that shrinks"
    for entry, features in [(start, 30), (shrinks[0], 32)]:
        topo = plan_topology((0.5, 0.5), entry["patch"])
        assert entry["estimate"] == memory.estimate(topo, features, 1, 2)
    assert memory.features_for_2d_estimate(False, 32) == 30 and memory.features_for_2d_estimate(True, 32) == 32


@pytest.mark.parametrize("gpu", [4.0, 16.0, 24.0])
def test_more_gpu_memory_gives_a_bigger_patch_or_batch(gpu):
    fp = fingerprint([(1.37, 1.25, 1.25)] * 20, [(115, 320, 232)] * 20)
    reference = plan(fp, MR, TWO).configurations["3d_fullres"]
    other = plan(fp, MR, TWO, gpu_memory_gb=gpu).configurations["3d_fullres"]
    work = math.prod(other.patch_size) * other.batch_size
    reference_work = math.prod(reference.patch_size) * reference.batch_size
    assert (work > reference_work) == (gpu > 8)
    assert other.memory["budget"] == pytest.approx(reference.memory["budget"] * gpu / 8)
    assert other.memory["estimate"] <= other.memory["budget"]


# -- patch shrinking ----------------------------------------------------------------------
def test_shrink_picks_the_axis_largest_relative_to_the_median_image():
    assert axis_to_shrink((128, 256, 256), (100, 400, 400)) == 0
    assert axis_to_shrink((64, 256, 128), (128, 256, 256)) == 1
    assert axis_to_shrink((64, 128, 128), (64, 128, 128)) == 2  # ties: the last axis, as v1


def test_first_shrink_step_is_logged_on_the_relatively_largest_axis():
    # 300 x 400 x 400 at 1 mm pads to 320 x 448 x 448 (6 poolings each): 448 / 400 = 112% beats
    # 320 / 300 = 107%, so x (the last of the tied y, x) shrinks first, by 2^6 = 64 voxels.
    plans = plan(fingerprint([(1.0, 1.0, 1.0)] * 10, [(300, 400, 400)] * 10), MR, TWO)
    steps = [e for e in plans.configurations["3d_fullres"].explanation if e["topic"] == "shrink"]
    assert (steps[0]["axis"], steps[0]["before"], steps[0]["after"]) == (2, 448, 384)
    assert (steps[1]["axis"], steps[1]["before"], steps[1]["after"]) == (1, 448, 384)
    assert steps[2]["axis"] == 0
    assert all(s["estimate"] > s["budget"] for s in steps[:-1]) and steps[-1]["estimate"] <= steps[-1]["budget"]


# -- batch size ---------------------------------------------------------------------------
def test_batch_cap_is_5_percent_of_the_dataset_voxels():
    # Hippocampus: 260 x 36 x 50 x 35 voxels, 5% of it / (40 x 56 x 40) = 9.14 -> 9.
    assert rules.batch_cap(260 * 36 * 50 * 35, (40, 56, 40)) == 9
    assert rules.final_batch_size(78, 9) == (9, "dataset_cap")
    assert rules.final_batch_size(2, 9) == (2, "memory")


def test_batch_is_never_below_2():
    assert rules.final_batch_size(40, 0) == (2, "minimum")
    # One tiny case: 5% of the data is less than one patch (3D cap 0, 2D cap 1), still batch 2.
    plans = plan(fingerprint([(1.0, 1.0, 1.0)], [(36, 50, 35)]), MR, TWO)
    assert plans.configurations["3d_fullres"].batch_size == 2
    assert plans.configurations["2d"].batch_size == 2


# -- cascade ------------------------------------------------------------------------------
def test_cascade_trigger_thresholds():
    assert rules.needs_lowres(4.0 * 1000, 1000) and not rules.needs_lowres(3.99 * 1000, 1000)
    assert rules.keep_lowres(499, 1000) and not rules.keep_lowres(500, 1000)
    assert rules.lowres_covers_enough(4000, 1000) and not rules.lowres_covers_enough(4001, 1000)


def test_lowres_spacing_grows_on_the_finer_axes_while_anisotropic():
    assert rules.lowres_spacing_step(np.array([5.0, 1.0, 1.0])) == pytest.approx([5.0, 1.01, 1.01])
    assert rules.lowres_spacing_step(np.array([1.5, 1.0, 1.0])) == pytest.approx([1.515, 1.01, 1.01])


def test_no_cascade_when_the_patch_covers_enough():
    plans = plan(fingerprint([(1.0, 1.0, 1.0)] * 10, [(200, 200, 200)] * 10), MR, TWO)
    entry = plans.configurations["3d_fullres"].explanation[-1]
    assert entry["topic"] == "cascade" and entry["tried"] is False and entry["coverage"] > 0.25
    assert "3d_lowres" not in plans.configurations


def test_cascade_tried_but_dropped_when_lowres_would_not_halve_the_image():
    # 128^3 covers 1/4.4 of a 210^3 image: lowres is tried, but about 3% coarser already suffices.
    plans = plan(fingerprint([(1.0, 1.0, 1.0)] * 10, [(210, 210, 210)] * 10), MR, TWO)
    entry = plans.configurations["3d_fullres"].explanation[-1]
    assert entry["tried"] is True and entry["kept"] is False and entry["reduction"] < 2
    assert "3d_lowres" not in plans.configurations and "3d_cascade_fullres" not in plans.configurations


def test_cascade_kept_for_large_images():
    plans = plan(fingerprint([(1.0, 1.0, 1.0)] * 10, [(400, 400, 400)] * 10), MR, TWO)
    entry = plans.configurations["3d_fullres"].explanation[-1]
    assert entry["kept"] is True and entry["reduction"] > 2
    assert {"3d_lowres", "3d_cascade_fullres"} <= set(plans.configurations)


# -- normalization ------------------------------------------------------------------------
CT = {"mean": 50.0, "std": 10.0, "median": 50.0, "min": 0.0, "max": 90.0,
      "percentile_00_5": 5.0, "percentile_99_5": 95.0}


@pytest.mark.parametrize("relative_size, masked", [(0.6, True), (0.75, False), (0.9, False)])
def test_normalization_scheme_per_channel_and_mask_rule(relative_size, masked):
    fp = fingerprint([(1.0, 1.0, 1.0)] * 4, [(30, 30, 30)] * 4, relative_size=relative_size,
                     intensity={"0": CT, "1": CT, "2": CT})
    plans = plan(fp, {0: "CT", 1: "t2", 2: " ct "}, TWO)
    config = plans.configurations["3d_fullres"]
    assert config.normalization_schemes == ["CTNormalization", "ZScoreNormalization", "CTNormalization"]
    # Only z-scored channels use the mask; CT statistics are dataset-wide and never masked.
    assert config.use_mask_for_norm == [False, masked, False]
    assert plans.configurations["2d"].normalization_schemes == config.normalization_schemes


def test_scheme_names_are_matched_whole_and_case_insensitively():
    assert rules.normalization_scheme("Ct") == "CTNormalization"
    assert rules.normalization_scheme("CTA") == "ZScoreNormalization"
    assert rules.use_mask_for_norm("CTNormalization", 0.1) is False


# -- resampling ---------------------------------------------------------------------------
@pytest.mark.parametrize("spacing, separate", [((5.0, 1.0, 1.0), True), ((3.0, 1.0, 1.0), False),
                                               ((1.37, 1.25, 1.25), False), ((1.0, 1.0, 3.5), True)])
def test_separate_z_resampling_flag(spacing, separate):
    settings = rules.resampling_settings(spacing)
    assert settings["separate_z_for_typical_case"] is separate
    assert (settings["image_order"], settings["label_order"], settings["out_of_plane_order"]) == (3, 1, 0)
    plans = plan(fingerprint([spacing] * 4, [(20, 40, 40)] * 4), MR, TWO)
    assert plans.configurations["3d_fullres"].resampling["separate_z_for_typical_case"] is separate


def test_anisotropic_patch_flags_in_plane_augmentation():
    assert rules.anisotropic_patch((20, 256, 224)) is True
    assert rules.anisotropic_patch((80, 192, 160)) is False


def test_batch_dice_for_2d_and_cascade_fullres_only():
    from AutoSegLib.planning.rules import use_batch_dice

    assert use_batch_dice(2, False) is True
    assert use_batch_dice(3, True) is True
    assert use_batch_dice(3, False) is False


# -- network variant ------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["ResidualEncoderUNet", "ConvSkipUNet"])
def test_a_network_variant_changes_only_the_architecture(architecture):
    fp = fingerprint([(1.0, 1.0, 1.0)] * 10, [(36, 50, 35)] * 10)
    plain, variant = plan(fp, MR, TWO), plan(fp, MR, TWO, architecture=architecture)
    for name, config in variant.configurations.items():
        expected = plain.configurations[name].to_dict()
        got = config.to_dict()
        assert got.pop("network")["architecture"] == architecture
        assert expected.pop("network")["architecture"] == "PlainConvUNet"
        got.pop("explanation"), expected.pop("explanation")
        assert got == expected
    assert any(architecture in e.get("message", "") for e in variant.explanation)
    # the plans file reads back and builds the chosen network
    from AutoSegLib.network import build_network
    from AutoSegLib.planning import Plans

    config = Plans.from_dict(variant.to_dict()).configurations["3d_fullres"].to_dict()
    assert type(build_network(config, 1, 2)).__name__ == "UNet"


def test_an_unknown_network_variant_is_refused():
    fp = fingerprint([(1.0, 1.0, 1.0)] * 10, [(36, 50, 35)] * 10)
    with pytest.raises(ValueError, match="unknown network architecture 'TransUNet'"):
        plan(fp, MR, TWO, architecture="TransUNet")


# -- 3d_cpu: the 3D rules at a CPU's size ----------------------------------------------------
def test_cpu_configuration_coarsens_until_the_typical_image_fits_the_cpu_budget():
    from AutoSegLib.planning import cpu

    # The CT phantoms: 37 x 91 x 101 voxels at 1.94 x 0.96 x 0.96 mm (340,000 voxels).
    fp = fingerprint([(1.9375, 0.96484375, 0.96484375)] * 10, [(37, 91, 101)] * 10)
    config = plan(fp, MR, TWO).configurations["3d_cpu"]
    median = config.median_image_size_in_voxels
    assert math.prod(median) <= cpu.CPU_IMAGE_VOXELS * 1.05  # the budget holds before rounding to whole voxels
    # one 1% step less would not have fitted: the coarsest spacing needed, no coarser
    finer = np.asarray(config.spacing) / 1.01
    assert np.prod(np.asarray([1.9375, 0.96484375, 0.96484375]) / finer * [37, 91, 101]) > cpu.CPU_IMAGE_VOXELS * 0.95
    # the finer axes were coarsened first (anisotropy 2.01 -> at most 2)
    assert config.spacing[0] / config.spacing[1] <= 2.0 + 1e-9
    assert config.features_per_stage[0] == 16 and config.batch_size == 2
    assert config.features_per_stage == [min(16 * 2 ** i, 320) for i in range(len(config.strides))]
    assert all(p >= m for p, m in zip(config.patch_size, median))  # the whole typical image
    assert any("For training on a CPU" in e["text"] for e in config.explanation)


def test_cpu_configuration_keeps_a_small_image_at_full_resolution_and_caps_a_large_patch():
    from AutoSegLib.planning import cpu

    small = plan(fingerprint([(1.0, 1.0, 1.0)] * 10, [(20, 30, 30)] * 10), MR, TWO).configurations
    assert small["3d_cpu"].spacing == small["3d_fullres"].spacing
    # Liver-sized CT: 482 x 512 x 512 voxels at 1 x 0.77 x 0.77 mm -> a coarse grid, bounded patch
    large = plan(fingerprint([(1.0, 0.7676, 0.7676)] * 10, [(482, 512, 512)] * 10), MR, TWO).configurations
    assert math.prod(large["3d_cpu"].patch_size) <= cpu.CPU_PATCH_VOXELS
    assert min(large["3d_cpu"].spacing) > 4 * 0.7676


def _cpu_plan(radii: dict | None, labels=None):
    # The CT phantoms' geometry (340,000 voxels at 1.94 x 0.96 x 0.96 mm), with class radii or without.
    fp = fingerprint([(1.9375, 0.96484375, 0.96484375)] * 10, [(37, 91, 101)] * 10)
    if radii is not None:
        fp["class_radius_mm"] = radii
    labels = labels or {"background": 0, **{name: i + 1 for i, name in enumerate(radii or {"organ": 0})}}
    return plan(fp, MR, labels).configurations


CT_PHANTOM_SPACING, CT_PHANTOM_IMAGE = (1.9375, 0.96484375, 0.96484375), (37, 91, 101)


def _cpu_3d(radii: dict | None):
    """The 3D stage of 3d_cpu for the CT phantoms' geometry (the plan may then choose 2D instead)."""
    from AutoSegLib.planning import cpu

    return cpu.configure_cpu(CT_PHANTOM_SPACING, CT_PHANTOM_IMAGE, ["z", "y", "x"], radii)


def _texts(stage) -> str:
    return " ".join(n["text"] for n in stage.notes)


def test_cpu_spacing_stops_at_the_thinnest_class_and_says_why():
    from AutoSegLib.planning import cpu

    across = cpu.MIN_VOXELS_ACROSS
    # Radii in units of the spacing they allow: a class of radius r keeps `across` voxels at 2r / across mm.
    free = _cpu_plan({"liver": 9.0 * across, "aorta": 3.5 * across})["3d_cpu"]  # nothing thin: sized by the image
    assert math.prod(free.median_image_size_in_voxels) <= cpu.CPU_IMAGE_VOXELS * 1.05
    assert any(f"thinnest class, aorta (radius {3.5 * across:.2f} mm)" in e["text"] for e in free.explanation)
    artery = 0.6 * across  # allows 1.2 mm voxels
    stage = _cpu_3d({"liver": 9.0 * across, "aorta": 3.5 * across, "renal_artery": artery})
    # Every axis at most 1.2 mm (the artery keeps `across` voxels), or its full-resolution spacing if coarser.
    assert np.all(np.asarray(stage.spacing) <= np.maximum(CT_PHANTOM_SPACING, 1.2) + 1e-9)
    assert stage.spacing[1] == pytest.approx(1.2, rel=0.011)  # coarsened up to the limit, not beyond
    assert stage.spacing[0] == CT_PHANTOM_SPACING[0]  # the slice axis was coarser already
    text = _texts(stage)
    assert f"renal_artery (radius {artery:.2f} mm" in text and f"keeps {across} voxels across" in text
    assert f"would be under {across} voxels across (renal_artery)" in text  # what sizing by the image would do
    assert math.prod(stage.patch_size) <= cpu.CPU_PATCH_VOXELS * 1.05  # the cost per iteration is unchanged
    assert stage.batch_size == 2


def test_cpu_spacing_keeps_full_resolution_when_the_thinnest_class_is_one_voxel():
    stage = _cpu_3d({"organ": 6.0, "nerve": 0.5})
    assert stage.spacing == CT_PHANTOM_SPACING
    assert "kept at the full-resolution spacing" in _texts(stage)


def test_cpu_spacing_without_class_radii_is_sized_by_the_image_and_says_so():
    old = _cpu_plan(None)["3d_cpu"]  # an nnU-Net v2 fingerprint has no radii
    assert any("no class radii" in e["text"] for e in old.explanation)
    assert old.spacing == _cpu_plan({"organ": 50.0})["3d_cpu"].spacing  # a thick class changes nothing


def test_cpu_spacing_ignores_radii_of_unknown_classes_and_refuses_bad_ones():
    configurations = _cpu_plan({"organ": 50.0, "gone": 0.3}, labels={"background": 0, "organ": 1})
    assert configurations["3d_cpu"].spacing != configurations["3d_fullres"].spacing  # 'gone' is not a label
    assert len(configurations["3d_cpu"].patch_size) == 3
    with pytest.raises(ValueError, match="class_radius_mm"):
        _cpu_plan({"organ": -1.0})


def test_cpu_plan_stays_3d_while_its_patch_sees_half_the_image_and_says_so():
    from AutoSegLib.planning import cpu

    config = _cpu_plan({"liver": 40.0, "aorta": 3.46})["3d_cpu"]  # the CT phantoms: 70% of the image
    assert len(config.patch_size) == 3 and config.batch_size == 2 and not config.batch_dice
    assert any("so 3d_cpu stays 3D" in e["text"] for e in config.explanation)
    assert cpu.patch_coverage(_cpu_3d({"liver": 40.0, "aorta": 3.46})) >= cpu.MIN_3D_COVERAGE


def test_cpu_plan_goes_2d_where_the_thinnest_class_leaves_a_3d_patch_a_corner_of_the_image():
    from AutoSegLib.planning import cpu

    radii = {"liver": 40.0, "renal_artery": 1.2}  # 0.6 mm allowed: full resolution, 340,000 voxels
    three_d = _cpu_3d(radii)
    assert cpu.patch_coverage(three_d) < cpu.MIN_3D_COVERAGE
    configurations = _cpu_plan(radii)
    config, two_d = configurations["3d_cpu"], configurations["2d"]
    # Whole slices at the 2d configuration's in-plane spacing (the artery allows no coarser), a CPU's size.
    assert config.spacing == two_d.spacing and config.patch_size == two_d.patch_size == [96, 112]
    assert config.features_per_stage == [min(16 * 2 ** i, 512) for i in range(len(config.strides))]
    assert config.batch_size == cpu.cpu_2d_batch((96, 112), 10**9) == 10  # 110,000 / 10,752 pixels
    assert config.batch_dice and not config.dummy_2d_augmentation
    text = " ".join(e["text"] for e in config.explanation)
    assert "3d_cpu is a 2D network here" in text
    assert f"sees {cpu.patch_coverage(three_d):.0%} of the typical image" in text
    assert "renal_artery (radius 1.20 mm), keeps at least 4 voxels across" in text
    # the network it names is built and runs on a slice batch
    import torch

    from AutoSegLib.network import build_network

    net = build_network(config.to_dict(), 1, 3)
    out = net(torch.zeros(2, 1, *config.patch_size))
    assert tuple((out[0] if isinstance(out, (list, tuple)) else out).shape) == (2, 3, 96, 112)


def test_cpu_plan_in_2d_coarsens_large_slices_in_plane_and_bounds_the_step():
    from AutoSegLib.planning import cpu

    # A whole-body CT: 300 x 512 x 512 voxels at 1.5 x 0.8 x 0.8 mm, ribs and vessels 1.6 mm thick.
    fp = fingerprint([(1.5, 0.8, 0.8)] * 10, [(300, 512, 512)] * 10)
    fp["class_radius_mm"] = {"liver": 40.0, "rib": 3.0, "vessel": 0.8}
    config = plan(fp, MR, {"background": 0, "liver": 1, "rib": 2, "vessel": 3}).configurations["3d_cpu"]
    assert len(config.patch_size) == 2
    assert config.spacing == [0.8, 0.8]  # the vessel allows 0.8 mm: no coarser
    assert math.prod(config.patch_size) <= cpu.CPU_PATCH_VOXELS * 1.05  # shrunk, as the 3D patch is
    assert config.batch_size * math.prod(config.patch_size) <= 2 * cpu.CPU_2D_STEP_PIXELS
    # Ribs alone (3 mm voxels allowed): 3D stops at 3 mm with 150 x 137 x 137 voxels (a patch sees 3%), so
    # 2D again, whose slices are coarsened in plane until a typical slice fits the CPU's image, no further.
    fp["class_radius_mm"] = {"liver": 40.0, "rib": 6.0}
    coarse = plan(fp, MR, {"background": 0, "liver": 1, "rib": 2}).configurations["3d_cpu"]
    assert len(coarse.patch_size) == 2 and coarse.spacing[0] == coarse.spacing[1]
    assert math.prod(coarse.median_image_size_in_voxels) <= cpu.CPU_IMAGE_VOXELS * 1.02
    assert math.prod(coarse.median_image_size_in_voxels) * 1.01 ** 2 > cpu.CPU_IMAGE_VOXELS * 0.98  # no coarser
    assert 0.8 < coarse.spacing[0] < 3.0
    assert any("coarsened from 0.80 x 0.80 to" in e["text"] for e in coarse.explanation)


def test_cpu_2d_batch_fills_the_step_within_the_dataset_cap():
    from AutoSegLib.planning import cpu

    assert cpu.cpu_2d_batch((96, 96), 10**9) == 12
    assert cpu.cpu_2d_batch((320, 320), 10**9) == 2  # never below the method's minimum
    assert cpu.cpu_2d_batch((96, 96), 30 * 96 * 96 * 4) == 6  # 5% of a small dataset caps it


def test_cpu_plan_names_2d_as_the_other_choice_for_thick_slices_and_thin_classes():
    # Small enough for a 3D patch to see it whole, so 3d_cpu stays 3D and names 2d as the other choice.
    fp = fingerprint([(5.0, 0.8, 0.8)] * 10, [(12, 60, 60)] * 10)
    fp["class_radius_mm"] = {"organ": 20.0, "vessel": 1.0}
    config = plan(fp, MR, {"background": 0, "organ": 1, "vessel": 2}).configurations["3d_cpu"]
    assert len(config.patch_size) == 3
    assert any("The 2d configuration" in e["text"] for e in config.explanation)
    fp["class_radius_mm"] = {"organ": 20.0, "vessel": 4.0}  # thicker than a slice: no remark
    config = plan(fp, MR, {"background": 0, "organ": 1, "vessel": 2}).configurations["3d_cpu"]
    assert not any("The 2d configuration" in e["text"] for e in config.explanation)
