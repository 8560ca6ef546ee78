// TrtglmRotary: rotary position embedding applied to Q and K (the first rotary_dim channels of each head;
// interleaved or half-split pairs), with cos/sin already gathered per token. See README.md.
#pragma once

#include "common/plugin.h"

namespace trtglm
{

class RotaryPlugin : public PluginBase<RotaryPlugin>
{
public:
    static constexpr char const* kNAME = "TrtglmRotary";

    RotaryPlugin(FieldReader const& fields, bool& ok) noexcept;
    RotaryPlugin(RotaryPlugin const&) = default;
    static void fieldNames(std::vector<char const*>& names);
    void fields(FieldWriter& w) const;

    int32_t getNbOutputs() const noexcept override { return 2; }
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

private:
    int32_t mRotaryDim = 0;   // 0: the whole head
    int32_t mInterleaved = 1; // 1: pairs (2i, 2i+1); 0: pairs (i, i + rotary_dim / 2)
};

} // namespace trtglm
