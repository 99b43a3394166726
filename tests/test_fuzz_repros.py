"""Shrunk failures the fuzzer found (tools/fuzz.py saves each with a pytest case like these),
kept as regression tests once fixed: each runs the fuzzer's whole oracle on the saved graph."""

from __future__ import annotations

import base64

import onnx
from tool_loader import load_tool

fuzz = load_tool("fuzz")


def test_lossless_unstable_4c3f82f380():
    """Focus slices (SpaceToDepth) read by an If: a second optimize changed the If: its body's value_info listed outer values, whose shapes the body lost on reload."""
    # fuzz (uint8 in0, double[N,1,2,2] in1) => (double[N,4,1,1] t34, double[N,4,1,1] t22) 
    #    <int64[2] c2 =  {1,1}, int64[2] c3 =  {9223372036854775807,9223372036854775807}, int64[2] c4 =  {2,3}, int64[2] c5 =  {2,2}, int64[2] c7 =  {0,1}, int64[2] c8 =  {9223372036854775807,9223372036854775807}, int64[2] c9 =  {2,3}, int64[2] c10 =  {2,2}, int64[2] c12 =  {0,0}, int64[2] c13 =  {9223372036854775807,9223372036854775807}, int64[2] c14 =  {2,3}, int64[2] c15 =  {2,2}, int64[2] c17 =  {1,0}, int64[2] c18 =  {9223372036854775807,9223372036854775807}, int64[2] c19 =  {2,3}, int64[2] c20 =  {2,2}, int64[1] c23 =  {-1}, int64 c25 =  {0}, double c27 =  {0}>
    # {
    #    t6 = Slice (in1, c2, c3, c4, c5)
    #    t11 = Slice (in1, c7, c8, c9, c10)
    #    t16 = Slice (in1, c12, c13, c14, c15)
    #    t21 = Slice (in1, c17, c18, c19, c20)
    #    t22 = Concat <axis: int = 1> (t6, t11, t16, t21)
    #    t24 = Reshape (t22, c23)
    #    t26 = Gather <axis: int = 0> (t24, c25)
    #    t28 = Less (t26, c27)
    #    t33 = If (t28) <else_branch: graph = else32 () => (double[N,4,1,1] else_out31) {
    #       else_out31_m1 = Constant <value: tensor = int64 {-1}> ()
    #       else_out31_min = Constant <value: tensor = int64 {-9223372036854775808}> ()
    #       else_out31_c = Constant <value: tensor = double {-1.25}> ()
    #       else_out31 = Add (t22, else_out31_c)
    #       else_out31_trap = Div (else_out31_min, else_out31_m1)
    #    }, then_branch: graph = then30 () => (double[N,4,1,1] then_out29) {
    #       then_out29 = Neg (t22)
    #    }>
    #    t34 = Relu (t33)
    # }
    model = onnx.load_from_string(base64.b64decode('CAcSDW9ubnhzbGltLWZ1eno60goKIAoDaW4xCgJjMgoCYzMKAmM0CgJjNRICdDYiBVNsaWNlCiIKA2luMQoCYzcKAmM4CgJjOQoDYzEwEgN0MTEiBVNsaWNlCiUKA2luMQoDYzEyCgNjMTMKA2MxNAoDYzE1EgN0MTYiBVNsaWNlCiUKA2luMQoDYzE3CgNjMTgKA2MxOQoDYzIwEgN0MjEiBVNsaWNlCi0KAnQ2CgN0MTEKA3QxNgoDdDIxEgN0MjIiBkNvbmNhdCoLCgRheGlzGAGgAQIKGAoDdDIyCgNjMjMSA3QyNCIHUmVzaGFwZQokCgN0MjQKA2MyNRIDdDI2IgZHYXRoZXIqCwoEYXhpcxgAoAECChUKA3QyNgoDYzI3EgN0MjgiBExlc3MKqgMKA3QyOBIDdDMzIgJJZiq+AgoLZWxzZV9icmFuY2gyqwIKMxINZWxzZV9vdXQzMV9tMSIIQ29uc3RhbnQqGAoFdmFsdWUqDBAHSgj//////////6ABBAo0Eg5lbHNlX291dDMxX21pbiIIQ29uc3RhbnQqGAoFdmFsdWUqDBAHSggAAAAAAAAAgKABBAoyEgxlbHNlX291dDMxX2MiCENvbnN0YW50KhgKBXZhbHVlKgwQC0oIAAAAAAAA9L+gAQQKJAoDdDIyCgxlbHNlX291dDMxX2MSCmVsc2Vfb3V0MzEiA0FkZAo1Cg5lbHNlX291dDMxX21pbgoNZWxzZV9vdXQzMV9tMRIPZWxzZV9vdXQzMV90cmFwIgNEaXYSBmVsc2UzMmIlCgplbHNlX291dDMxEhcKFQgLEhEKAxIBTgoCCAQKAggBCgIIAaABBSpZCgt0aGVuX2JyYW5jaDJHChYKA3QyMhIKdGhlbl9vdXQyOSIDTmVnEgZ0aGVuMzBiJQoKdGhlbl9vdXQyORIXChUICxIRCgMSAU4KAggECgIIAQoCCAGgAQUKEAoDdDMzEgN0MzQiBFJlbHUSBGZ1enoqGggCEAdCAmMyShABAAAAAAAAAAEAAAAAAAAAKhoIAhAHQgJjM0oQ/////////3//////////fyoaCAIQB0ICYzRKEAIAAAAAAAAAAwAAAAAAAAAqGggCEAdCAmM1ShACAAAAAAAAAAIAAAAAAAAAKhoIAhAHQgJjN0oQAAAAAAAAAAABAAAAAAAAACoaCAIQB0ICYzhKEP////////9//////////38qGggCEAdCAmM5ShACAAAAAAAAAAMAAAAAAAAAKhsIAhAHQgNjMTBKEAIAAAAAAAAAAgAAAAAAAAAqGwgCEAdCA2MxMkoQAAAAAAAAAAAAAAAAAAAAACobCAIQB0IDYzEzShD/////////f/////////9/KhsIAhAHQgNjMTRKEAIAAAAAAAAAAwAAAAAAAAAqGwgCEAdCA2MxNUoQAgAAAAAAAAACAAAAAAAAACobCAIQB0IDYzE3ShABAAAAAAAAAAAAAAAAAAAAKhsIAhAHQgNjMThKEP////////9//////////38qGwgCEAdCA2MxOUoQAgAAAAAAAAADAAAAAAAAACobCAIQB0IDYzIwShACAAAAAAAAAAIAAAAAAAAAKhMIARAHQgNjMjNKCP//////////KhEQB0IDYzI1SggAAAAAAAAAACoREAtCA2MyN0oIAAAAAAAAAABaDQoDaW4wEgYKBAgCEgBaHgoDaW4xEhcKFQgLEhEKAxIBTgoCCAEKAggCCgIIAmIeCgN0MzQSFwoVCAsSEQoDEgFOCgIIBAoCCAEKAggBYh4KA3QyMhIXChUICxIRCgMSAU4KAggECgIIAQoCCAFCBAoAEA0='))
    outcome = fuzz.run_case(model, fuzz.Mode(quantize=None, prune=None), input_seed=2)
    assert outcome.kind == 'ok', outcome.line()


def test_lossless_unstable_c43d8f47e8():
    """Focus slices (SpaceToDepth) read by an If: a second optimize changed the If: its body's value_info listed outer values, whose shapes the body lost on reload."""
    # fuzz (uint8 in0, float[N,5] in1, float[N,2,2,4] in26) => (float[N,2] t69, float[N,2] t22) 
    #    <float c4 =  {0.7978846}, float c5 =  {0.044715}, float c9 =  {1}, float c13 =  {0.5}, float[5,2] c15 =  {0.06286511,-0.06605243,0.32021132,0.052450057,-0.2678347,0.18079753,0.652,0.47354048,-0.35186762,-0.63271075}, float[2] c16 =  {-0.62327445,0.04132598}, float[2] c18 =  {1.3574042,0.53358555}, float[2] c19 =  {-1.245911,-0.7322674}, float[2] c20 =  {-0.544259,-0.31630015}, float[2] c21 =  {0.94956785,1.1340308}, float[2,1] c24 =  {-0.06426733,0.6832317}, int64[2] c27 =  {1,1}, int64[2] c28 =  {9223372036854775807,9223372036854775807}, int64[2] c29 =  {2,3}, int64[2] c30 =  {2,2}, int64[2] c32 =  {0,1}, int64[2] c33 =  {9223372036854775807,9223372036854775807}, int64[2] c34 =  {2,3}, int64[2] c35 =  {2,2}, int64[2] c37 =  {1,0}, int64[2] c38 =  {9223372036854775807,9223372036854775807}, int64[2] c39 =  {2,3}, int64[2] c40 =  {2,2}, int64[2] c42 =  {0,0}, int64[2] c43 =  {9223372036854775807,9223372036854775807}, int64[2] c44 =  {2,3}, int64[2] c45 =  {2,2}, float[1,8,1,1] c48 =  {0.45173508,0.04700615,-0.37174964,-0.4608627,-0.22886291,0.110097565,-0.5048091,-0.104587786}, float[1,2,1,1] c50 =  {-0.07961251,0.2704228}, int64[1] c53 =  {-1}, int64 c55 =  {0}, float c57 =  {0}>
    # {
    #    t2 = Mul (in1, in1)
    #    t3 = Mul (t2, in1)
    #    t6 = Mul (c5, t3)
    #    t7 = Add (in1, t6)
    #    t8 = Mul (c4, t7)
    #    t10 = Tanh (t8)
    #    t11 = Add (c9, t10)
    #    t12 = Mul (in1, t11)
    #    t14 = Mul (t12, c13)
    #    t17 = Gemm (t14, c15, c16)
    #    t22 = BatchNormalization <epsilon: float = 1e-05> (t17, c18, c19, c20, c21)
    #    t23 = Relu (t22)
    #    t25 = MatMul (t23, c24)
    #    t31 = Slice (in26, c27, c28, c29, c30)
    #    t36 = Slice (in26, c32, c33, c34, c35)
    #    t41 = Slice (in26, c37, c38, c39, c40)
    #    t46 = Slice (in26, c42, c43, c44, c45)
    #    t47 = Concat <axis: int = 1> (t31, t36, t41, t46)
    #    t49 = Conv <kernel_shape: ints = [1, 1]> (t47, c48)
    #    t51 = Conv <group: int = 1, kernel_shape: ints = [1, 1], pads: ints = [0, 0, 0, 0], strides: ints = [1, 1]> (in26, c50)
    #    t52 = Relu (t51)
    #    t54 = Reshape (t22, c53)
    #    t56 = Gather <axis: int = 0> (t54, c55)
    #    t58 = Less (t56, c57)
    #    t63 = If (t58) <else_branch: graph = else62 () => (float[N,2] else_out61) {
    #       else_out61_m1 = Constant <value: tensor = int64 {-1}> ()
    #       else_out61_min = Constant <value: tensor = int64 {-9223372036854775808}> ()
    #       else_out61_c = Constant <value: tensor = float {1}> ()
    #       else_out61 = Add (t22, else_out61_c)
    #       else_out61_trap = Div (else_out61_min, else_out61_m1)
    #    }, then_branch: graph = then60 () => (float[N,2] then_out59) {
    #       then_out59 = Neg (t22)
    #    }>
    #    t64 = Relu (t51)
    #    t65 = Relu (t63)
    #    t66 = Relu (t65)
    #    t67 = Relu (t66)
    #    t68 = Relu (t67)
    #    t69 = Relu (t68)
    # }
    model = onnx.load_from_string(base64.b64decode('CAcSDW9ubnhzbGltLWZ1eno61BEKEwoDaW4xCgNpbjESAnQyIgNNdWwKEgoCdDIKA2luMRICdDMiA011bAoRCgJjNQoCdDMSAnQ2IgNNdWwKEgoDaW4xCgJ0NhICdDciA0FkZAoRCgJjNAoCdDcSAnQ4IgNNdWwKDwoCdDgSA3QxMCIEVGFuaAoTCgJjOQoDdDEwEgN0MTEiA0FkZAoUCgNpbjEKA3QxMRIDdDEyIgNNdWwKFAoDdDEyCgNjMTMSA3QxNCIDTXVsChoKA3QxNAoDYzE1CgNjMTYSA3QxNyIER2VtbQpFCgN0MTcKA2MxOAoDYzE5CgNjMjAKA2MyMRIDdDIyIhJCYXRjaE5vcm1hbGl6YXRpb24qEQoHZXBzaWxvbhWsxSc3oAEBChAKA3QyMhIDdDIzIgRSZWx1ChcKA3QyMwoDYzI0EgN0MjUiBk1hdE11bAomCgRpbjI2CgNjMjcKA2MyOAoDYzI5CgNjMzASA3QzMSIFU2xpY2UKJgoEaW4yNgoDYzMyCgNjMzMKA2MzNAoDYzM1EgN0MzYiBVNsaWNlCiYKBGluMjYKA2MzNwoDYzM4CgNjMzkKA2M0MBIDdDQxIgVTbGljZQomCgRpbjI2CgNjNDIKA2M0MwoDYzQ0CgNjNDUSA3Q0NiIFU2xpY2UKLgoDdDMxCgN0MzYKA3Q0MQoDdDQ2EgN0NDciBkNvbmNhdCoLCgRheGlzGAGgAQIKLAoDdDQ3CgNjNDgSA3Q0OSIEQ29udioVCgxrZXJuZWxfc2hhcGVAAUABoAEHCmAKBGluMjYKA2M1MBIDdDUxIgRDb252KgwKBWdyb3VwGAGgAQIqFQoMa2VybmVsX3NoYXBlQAFAAaABByoRCgRwYWRzQABAAEAAQACgAQcqEAoHc3RyaWRlc0ABQAGgAQcKEAoDdDUxEgN0NTIiBFJlbHUKGAoDdDIyCgNjNTMSA3Q1NCIHUmVzaGFwZQokCgN0NTQKA2M1NRIDdDU2IgZHYXRoZXIqCwoEYXhpcxgAoAECChUKA3Q1NgoDYzU3EgN0NTgiBExlc3MKlgMKA3Q1OBIDdDYzIgJJZiqyAgoLZWxzZV9icmFuY2gynwIKMxINZWxzZV9vdXQ2MV9tMSIIQ29uc3RhbnQqGAoFdmFsdWUqDBAHSgj//////////6ABBAo0Eg5lbHNlX291dDYxX21pbiIIQ29uc3RhbnQqGAoFdmFsdWUqDBAHSggAAAAAAAAAgKABBAouEgxlbHNlX291dDYxX2MiCENvbnN0YW50KhQKBXZhbHVlKggQAUoEAACAP6ABBAokCgN0MjIKDGVsc2Vfb3V0NjFfYxIKZWxzZV9vdXQ2MSIDQWRkCjUKDmVsc2Vfb3V0NjFfbWluCg1lbHNlX291dDYxX20xEg9lbHNlX291dDYxX3RyYXAiA0RpdhIGZWxzZTYyYh0KCmVsc2Vfb3V0NjESDwoNCAESCQoDEgFOCgIIAqABBSpRCgt0aGVuX2JyYW5jaDI/ChYKA3QyMhIKdGhlbl9vdXQ1OSIDTmVnEgZ0aGVuNjBiHQoKdGhlbl9vdXQ1ORIPCg0IARIJCgMSAU4KAggCoAEFChAKA3Q1MRIDdDY0IgRSZWx1ChAKA3Q2MxIDdDY1IgRSZWx1ChAKA3Q2NRIDdDY2IgRSZWx1ChAKA3Q2NhIDdDY3IgRSZWx1ChAKA3Q2NxIDdDY4IgRSZWx1ChAKA3Q2OBIDdDY5IgRSZWx1EgRmdXp6KgwQAUICYzRKBCpCTD8qDBABQgJjNUoEEyc3PSoMEAFCAmM5SgQAAIA/Kg0QAUIDYzEzSgQAAAA/KjUIBQgCEAFCA2MxNUoobL+APX9Gh7298qM+39VWPaEhib79Ijk+eekmP+Zz8j7+J7S+VfkhvyoTCAIQAUIDYzE2Sgjqjh+/bkUpPSoTCAIQAUIDYzE4Sghsv60/EJkIPyoTCAIQAUIDYzE5SggDep+/4HU7vyoTCAIQAUIDYzIwSgiPVAu/GPKhvioTCAIQAUIDYzIxSgjhFnM/7CeRPyoVCAIIARABQgNjMjRKCJeeg71G6C4/KhsIAhAHQgNjMjdKEAEAAAAAAAAAAQAAAAAAAAAqGwgCEAdCA2MyOEoQ/////////3//////////fyobCAIQB0IDYzI5ShACAAAAAAAAAAMAAAAAAAAAKhsIAhAHQgNjMzBKEAIAAAAAAAAAAgAAAAAAAAAqGwgCEAdCA2MzMkoQAAAAAAAAAAABAAAAAAAAACobCAIQB0IDYzMzShD/////////f/////////9/KhsIAhAHQgNjMzRKEAIAAAAAAAAAAwAAAAAAAAAqGwgCEAdCA2MzNUoQAgAAAAAAAAACAAAAAAAAACobCAIQB0IDYzM3ShABAAAAAAAAAAAAAAAAAAAAKhsIAhAHQgNjMzhKEP////////9//////////38qGwgCEAdCA2MzOUoQAgAAAAAAAAADAAAAAAAAACobCAIQB0IDYzQwShACAAAAAAAAAAIAAAAAAAAAKhsIAhAHQgNjNDJKEAAAAAAAAAAAAAAAAAAAAAAqGwgCEAdCA2M0M0oQ/////////3//////////fyobCAIQB0IDYzQ0ShACAAAAAAAAAAMAAAAAAAAAKhsIAhAHQgNjNDVKEAIAAAAAAAAAAgAAAAAAAAAqMQgBCAgIAQgBEAFCA2M0OEog0knnPoWJQD34Vb6+Mvbrvgpbar7VeuE9KzsBvx8y1r0qGQgBCAIIAQgBEAFCA2M1MEoI4gujvdt0ij4qEwgBEAdCA2M1M0oI//////////8qERAHQgNjNTVKCAAAAAAAAAAAKg0QAUIDYzU3SgQAAAAAWg0KA2luMBIGCgQIAhIAWhYKA2luMRIPCg0IARIJCgMSAU4KAggFWh8KBGluMjYSFwoVCAESEQoDEgFOCgIIAgoCCAIKAggEYhYKA3Q2ORIPCg0IARIJCgMSAU4KAggCYhYKA3QyMhIPCg0IARIJCgMSAU4KAggCQgQKABAN'))
    outcome = fuzz.run_case(model, fuzz.Mode(quantize=None, prune=None), input_seed=0)
    assert outcome.kind == 'ok', outcome.line()


def test_prune_0_3_invalid_3b6684930b():
    """fuse-matmul-add left the Gemm where the MatMul stood, before the Relus computing its C: nodes out of order."""
    # fuzz (float[N,1,3,3] in0, float[N,1] in1) => (float[N,1] t6) 
    #    <float[1,1] c2 =  {0.06286511}>
    # {
    #    t3 = MatMul (in1, c2)
    #    t4 = Relu (in1)
    #    t5 = Relu (t4)
    #    t6 = Add (t3, t5)
    # }
    model = onnx.load_from_string(base64.b64decode('CAcSDW9ubnhzbGltLWZ1eno6sgEKFQoDaW4xCgJjMhICdDMiBk1hdE11bAoPCgNpbjESAnQ0IgRSZWx1Cg4KAnQ0EgJ0NSIEUmVsdQoRCgJ0MwoCdDUSAnQ2IgNBZGQSBGZ1enoqEAgBCAEQAUICYzJKBGy/gD1aHgoDaW4wEhcKFQgBEhEKAxIBTgoCCAEKAggDCgIIA1oWCgNpbjESDwoNCAESCQoDEgFOCgIIAWIVCgJ0NhIPCg0IARIJCgMSAU4KAggBQgQKABAN'))
    outcome = fuzz.run_case(model, fuzz.Mode(quantize=None, prune=0.3), input_seed=0, lossy={'calibration': 'finite', 'quantize_mode': 'full', 'method': 'minmax', 'criterion': 'auto', 'allocation': 'sensitivity'})
    assert outcome.kind == 'ok', outcome.line()
