use super::*;

/// Under CI the NVRTC wheel is installed and tests/run.sh puts it on the loader path, so
/// the compile tests must run there; elsewhere they say why they did not.
fn nvrtc_or_skip(test: &str) -> bool {
    if nvrtc_present() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: libnvrtc is not loadable under CI (see tests/run.sh)"
    );
    eprintln!("{test}: SKIPPED, libnvrtc not loadable");
    false
}

#[test]
fn every_source_file_is_embedded() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    on_disk.sort();
    let embedded: Vec<String> = SOURCES.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(on_disk, embedded);
    for (name, _) in SOURCES {
        let text = program_source(name).unwrap();
        assert!(!text.contains("#include"), "{name} still includes a header");
    }
    assert!(matches!(
        program_source("nope.cu"),
        Err(CudaError::UnknownSource(_))
    ));
}

#[test]
fn no_driver_is_a_clear_error_not_a_panic() {
    if driver_present() {
        eprintln!("libcuda present: the no-driver path cannot be exercised here");
        return;
    }
    let dir = std::env::temp_dir().join(format!("sov-kernels-nodriver-{}", std::process::id()));
    let err = Kernels::new(0, &dir)
        .err()
        .expect("no driver, so no device");
    assert!(matches!(err, CudaError::NoDriver), "{err}");
    assert!(err.to_string().contains("libcuda"));
}

/// Also: every prefill design resolves to an entry point its source has.
#[test]
fn kernels_compile_to_cubins_and_are_cached() {
    if !nvrtc_or_skip("kernels_compile_to_cubins_and_are_cached") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("sov-kernels-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut files = 0;
    let mut cubins = std::collections::HashMap::new();
    // The decode path's sources have PDL code (SOV_PDL=1 builds them apart, sm_90+); the
    // prefill ones do not.
    for name in ["gemv.cu", "decode_attention.cu", "rope_kv.cu", "norm.cu"] {
        assert!(has_pdl_code(name), "{name}");
    }
    assert!(!has_pdl_code("prefill_wgmma.cu") && !has_pdl_code("no_such.cu"));
    for (device, pdl) in [("sm_80", false), ("sm_90", false), ("sm_90", true)] {
        for (name, _) in SOURCES {
            if pdl && !has_pdl_code(name) {
                continue;
            }
            let Some(arch) = build_arch(name, device) else {
                assert_eq!(
                    *name, "prefill_wgmma.cu",
                    "only the wgmma kernels skip {device}"
                );
                continue;
            };
            let arch = arch.as_str();
            files += 1;
            let (cubin, cached) = cached_cubin(&dir, name, arch, pdl).unwrap();
            assert!(!cached, "{name}: first build must compile");
            // An ELF image (cubin), not PTX text.
            assert_eq!(&cubin[..4], b"\x7fELF", "{name} for {arch}");
            let (again, cached) = cached_cubin(&dir, name, arch, pdl).unwrap();
            assert!(cached, "{name}: second build must come from the cache");
            assert_eq!(again, cubin);
            if pdl {
                // The PDL build compiles the griddepcontrol code in.
                assert_ne!(
                    cubins.get(&(*name, device)),
                    Some(&cubin),
                    "{name}: PDL build"
                );
            } else {
                cubins.insert((*name, device), cubin);
            }
        }
    }
    // One cache file per (source, arch, PDL or not).
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), files);
    std::fs::remove_dir_all(&dir).unwrap();
    // Every prefill design the launcher can pick, at every head_dim and cache type, names
    // an entry point its source has (in the cubin's symbol strings, NUL-terminated).
    use launch::PrefillKernel;
    for device in ["sm_80", "sm_90"] {
        for kind in PrefillKernel::ALL {
            for hd in [64, 96, 128] {
                for fp8 in [false, true] {
                    // What `PrefillKernel::resolve` does without a device at hand.
                    let run = if fp8 {
                        PrefillKernel::Basic
                    } else {
                        let k = kind.for_head_dim(hd);
                        match build_arch(k.entry(hd, false).0, device) {
                            Some(_) => k,
                            None => PrefillKernel::Pipelined,
                        }
                    };
                    let (source, entry, rows, threads) = run.entry(hd, fp8);
                    assert!(rows > 0 && threads % 128 == 0, "{entry}");
                    let cubin = &cubins[&(source, device)];
                    let want = [entry.as_bytes(), b"\0"].concat();
                    assert!(
                        cubin.windows(want.len()).any(|w| w == want.as_slice()),
                        "{kind:?} at head_dim {hd} (fp8 {fp8}) on {device}: no {entry} in {source}"
                    );
                }
            }
        }
        // The GEMV entry points the launchers name (`{name}_t{T}`, T = gemv_rows; the
        // register design's `{name}_regs_t{T}` at T = 1 and 2).
        for (name, ts) in [
            ("gemv", &[1, 2, 4, 8][..]),
            ("gemv_norm", &[1, 2, 4, 8]),
            ("gemv_norm_late", &[1, 2, 4, 8]),
            ("gemv_norm_rope", &[1, 2, 4, 8]),
            ("gemv_norm_late_rope", &[1, 2, 4, 8]),
            ("gemv_add", &[1, 2, 4, 8]),
            ("gemv_silu_add", &[1, 2, 4, 8]),
            ("gemv_regs", &[1, 2]),
            ("gemv_norm_regs", &[1, 2]),
            ("gemv_add_regs", &[1, 2]),
            ("gemv_silu_add_regs", &[1, 2]),
        ] {
            for &t in ts {
                let want = format!("{name}_t{t}\0");
                let cubin = &cubins[&("gemv.cu", device)];
                assert!(
                    cubin.windows(want.len()).any(|w| w == want.as_bytes()),
                    "no {name}_t{t} in gemv.cu for {device}"
                );
            }
        }
        // The sampling entry points the worker's step launches.
        for entry in ["apply_penalties", "argmax_rows", "sample_rows", "topk_rows"] {
            let want = format!("{entry}\0");
            let cubin = &cubins[&("sampling.cu", device)];
            assert!(
                cubin.windows(want.len()).any(|w| w == want.as_bytes()),
                "no {entry} in sampling.cu for {device}"
            );
        }
    }
}

#[test]
fn a_bad_architecture_is_a_compile_error_with_the_reason() {
    if !nvrtc_or_skip("a_bad_architecture_is_a_compile_error_with_the_reason") {
        return;
    }
    let err = compile_cubin("act.cu", "sm_1", false).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("act.cu") && text.contains("sm_1"), "{text}");
}

#[test]
fn the_carveout_setting_defaults_with_pdl_and_refuses_bad_values() {
    // Unset: the most shared memory with PDL, the driver's choice without.
    assert_eq!(carveout_setting(None, true).unwrap(), Some(100));
    assert_eq!(carveout_setting(None, false).unwrap(), None);
    assert_eq!(carveout_setting(Some(" "), true).unwrap(), Some(100));
    // -1 asks for the driver's choice even with PDL; 0..=100 is taken as given.
    assert_eq!(carveout_setting(Some("-1"), true).unwrap(), None);
    assert_eq!(carveout_setting(Some("0"), false).unwrap(), Some(0));
    assert_eq!(carveout_setting(Some("100"), false).unwrap(), Some(100));
    assert_eq!(carveout_setting(Some(" 50 "), true).unwrap(), Some(50));
    for bad in ["101", "-2", "max", "12.5"] {
        let err = carveout_setting(Some(bad), true).unwrap_err().to_string();
        assert!(
            err.contains("SOV_SMEM_CARVEOUT") && err.contains(bad) && err.contains("0..=100"),
            "{err}"
        );
    }
}

#[test]
fn the_gemv_stage_setting_takes_smem_or_regs_and_refuses_the_rest() {
    assert!(!gemv_regs_setting(None).unwrap());
    assert!(!gemv_regs_setting(Some("")).unwrap());
    assert!(!gemv_regs_setting(Some("smem")).unwrap());
    assert!(gemv_regs_setting(Some("regs")).unwrap());
    assert!(gemv_regs_setting(Some(" regs ")).unwrap());
    for bad in ["registers", "1", "REGS"] {
        let err = gemv_regs_setting(Some(bad)).unwrap_err().to_string();
        assert!(err.contains("SOV_GEMV_STAGE") && err.contains(bad), "{err}");
    }
}
